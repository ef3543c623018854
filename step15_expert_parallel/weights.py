"""Where a rank's weights come from, a block at a time: from step 12 on no rank builds the whole model.

train.py builds the model on the meta device (shapes, no memory), cuts it for tp, pp and ZeRO, and only then
gives each rank the values of what it keeps, read through one interface:

    source.shape(name)                  the shape of tensor `name` of the full model
    source.read_block(name, rows, cols) full[rows[0]:rows[1], cols[0]:cols[1]] of it, in fp32 (1-D: one column)

from one of three sources: SeededWeights (the seed, here), hf_weights.HFWeights (a Hugging Face directory, read
by slices) and checkpoint.SavedTensors (a checkpoint, from the pieces of the files that hold the rows asked for).
"""
import functools

from expert_parallel import expert_placement
from model import seeded_parameters
from pipeline_parallel import global_name
from tensor_parallel import local_elements, tp_split_of_model


class SeededWeights:
    """The values Llama(config) draws from the seed (model.seeded_parameters), one full tensor at a time: a tensor
    is computed when first asked for and dropped when a later one is. Ask in the model's order (as
    ZeroDataParallel.load_parameters does); the tensors between are computed and dropped (the other stages')."""

    def __init__(self, config, seed):
        self.stream = seeded_parameters(config, seed)
        self.name, self.tensor = None, None

    def shape(self, name):
        return self._tensor(name).shape

    def read_block(self, name, rows, cols):
        tensor = self._tensor(name)
        return tensor.reshape(tensor.shape[0], -1)[rows[0]:rows[1], cols[0]:cols[1]]

    def _tensor(self, name):
        while self.name != name:
            self.name, self.tensor = next(self.stream, (None, None))
            if self.name is None:
                raise RuntimeError(f"SeededWeights: {name!r} asked for after the tensors that follow it in the model")
        return self.tensor


def parameter_reader(source, model, key=lambda name: name):
    """read(name, start, end) for ZeroDataParallel.load_parameters: the elements [start, end) of this rank's tp shard
    of a parameter (flattened, fp32), read from `source` under key(its name in the full model)."""
    module = model.module
    layer_ids = getattr(module, "layer_ids", None)  # a pipeline stage's layers: their global indices
    tp_split = tp_split_of_model(module)
    # expert parallelism: a rank's experts are one range [offset, offset + numel) of the full tensor, flattened
    experts = expert_placement(module)
    placement = {name: experts[param] for name, param in module.named_parameters() if param in experts}

    def read(name, start, end):
        full_name = key(global_name(name, layer_ids))
        read_block = functools.partial(source.read_block, full_name)
        if name in placement:
            offset, shape = placement[name]
            return local_elements(read_block, shape, None, start + offset, end + offset).float()
        return local_elements(read_block, source.shape(full_name), tp_split.get(name), start, end).float()
    return read
