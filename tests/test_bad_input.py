"""Bad input stops every rank promptly with one line naming the offending values (DESIGN.md)."""
import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

CASES = {
    # name: (step, nproc, args, words the error line must contain)
    "world_size": ("step2", 2, ["--dp_size", 1], ["world size 2", "dp_size 1", "= 1"]),
    "heads_vs_tp": ("step3", 3, ["--tp_size", 3], ["num_attention_heads 8 is not divisible by tp_size 3",
                                                   "num_key_value_heads 4 is not divisible by tp_size 3"]),
    "hidden_vs_heads": ("step3", 1, ["--num_attention_heads", 12, "--num_key_value_heads", 4],
                        ["hidden_size 256 is not divisible by num_attention_heads 12"]),
    "kv_heads": ("step1", 1, ["--num_key_value_heads", 3], ["num_attention_heads 8", "num_key_value_heads 3"]),
    "stages_vs_layers": ("step3", 2, ["--pp_size", 2, "--num_hidden_layers", 1],
                         ["pp_size 2 is larger than num_hidden_layers 1"]),
    "model_dir_missing": ("step3", 1, ["--model_name", "/nonexistent/model"],
                          ["/nonexistent/model", "not a local directory", "--model_name assets/tiny_llama"]),
    "model_hub_offline": ("step2", 1, ["--model_name", "TinyLlama/TinyLlama_v1.1"],
                          ["TinyLlama/TinyLlama_v1.1", "hub", "--model_name assets/tiny_llama"]),
    "dataset_hub_offline": ("step3", 1, ["--dataset_name", "roneneldan/TinyStories"],
                            ["roneneldan/TinyStories", "hub", "--dataset_name assets/tiny_stories"]),
    "dataset_dir_missing": ("step3", 2, ["--dataset_name", "/nonexistent/corpus", "--dp_size", 2],
                            ["/nonexistent/corpus", "--dataset_name assets/tiny_stories"]),
}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_corpus")
    with gzip.open(folder / "train.jsonl.gz", "wt") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"story number {i} is short."}) + "\n")
    return folder


@pytest.fixture(scope="module")
def outcomes(torchrun, tiny_corpus):
    cases = dict(CASES)
    cases["dataset_too_small"] = ("step5", 2, ["--dataset_name", tiny_corpus, "--dp_size", 2, "--seq_len", 8,
                                               "--micro_batch_size", 4, "--gradient_accumulation_steps", 2],
                                  ["fewer than one global batch", "micro_batch_size 4", "gradient_accumulation_steps 2",
                                   "dp_size 2 = 16"])

    def launch(item):
        name, (step, nproc, args, words) = item
        start = time.time()
        run = torchrun(step, nproc, *args, "--max_tokens", 64, cached=False, timeout=120)
        return name, (run, time.time() - start, words)

    # Two launches at a time: each is mostly interpreter start-up, so they overlap well on two cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(launch, cases.items()))


@pytest.mark.parametrize("name", [*CASES, "dataset_too_small"])
def test_bad_input_fails_fast_with_a_clear_line(outcomes, name):
    run, seconds, words = outcomes[name]
    assert run.returncode != 0, run
    assert seconds < 60, seconds
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, run  # one line, not one per rank
    for word in words:
        assert word in error_lines[0], (word, error_lines[0])
    assert "Step: 1" not in run.stdout
