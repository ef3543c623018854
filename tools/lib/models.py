"""The model-size flags the ZeRO tools share (benchmark_zero.py, benchmark_fsdp.py, fsdp_timeline.py), and the
Llama config they make."""
import argparse

from transformers import LlamaConfig

from lib.steps import ROOT


def model_arguments(description, hidden_size=256, intermediate_size=768, num_hidden_layers=40, vocab_size=512,
                    seq_len=64, micro_batch_size=1):
    """A parser with the model-size flags that model_config reads: by default 31.7M parameters in 40 layers of
    hidden 256, so that no single parameter is large."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default=str(ROOT / "assets" / "tiny_llama"), help="config to start from")
    parser.add_argument("--hidden_size", type=int, default=hidden_size)
    parser.add_argument("--intermediate_size", type=int, default=intermediate_size)
    parser.add_argument("--num_hidden_layers", type=int, default=num_hidden_layers)
    parser.add_argument("--vocab_size", type=int, default=vocab_size)
    parser.add_argument("--seq_len", type=int, default=seq_len)
    parser.add_argument("--micro_batch_size", type=int, default=micro_batch_size)
    return parser


def model_config(args):
    """The config of --model_name with the sizes of model_arguments' flags."""
    config = LlamaConfig.from_pretrained(args.model_name)
    config.update({name: getattr(args, name) for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "vocab_size")})
    config.head_dim = config.hidden_size // config.num_attention_heads  # loading derived it from the file's size
    return config
