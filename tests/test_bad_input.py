"""Bad input stops every rank promptly with one line naming the offending values, and a plain
`python train.py` (no torchrun) trains as one process."""
import argparse
import json
import re
import sys
import time

import pytest
import transformers

from conftest import ROOT, concurrently, import_step, write_corpus

STEPS = [f"step{n}" for n in range(1, 13)]

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


# The README's table of bad input, one case per row, spread over the steps; `python train.py` without torchrun
# (one process), which is also what a learner types first. {dir} is a folder, {data} and {model} name the
# broken datasets and model folders that `broken_inputs` makes.
PLAIN_CASES = {
    "seq_len_0": ("step1", ["--seq_len", 0], ["argument --seq_len", "got 0"]),
    "micro_batch_size_0": ("step2", ["--micro_batch_size", 0], ["argument --micro_batch_size", "got 0"]),
    "max_tokens_0": ("step3", ["--max_tokens", 0], ["argument --max_tokens", "got 0"]),
    "float16": ("step4", ["--dtype", "float16"], ["--dtype float16 is refused", "loss", "--dtype bfloat16"]),
    "max_tokens_negative": ("step5", ["--max_tokens", -5], ["argument --max_tokens", "got -5"]),
    "metrics_file_is_a_dir": ("step5", ["--metrics_file", "{dir}"], ["argument --metrics_file", "{dir}",
                                                                      "is a directory"]),
    "gradient_accumulation_steps_0": ("step6", ["--gradient_accumulation_steps", 0],
                                      ["argument --gradient_accumulation_steps", "got 0"]),
    "no_text_column": ("step6", ["--dataset_name", "{data}/no_text"], ["{data}/no_text", "no 'text' column",
                                                                       "['story']"]),
    "num_attention_heads_0": ("step7", ["--num_attention_heads", 0], ["argument --num_attention_heads", "got 0"]),
    "null_text": ("step7", ["--dataset_name", "{data}/null_text"], ["{data}/null_text", "have no text (null)",
                                                                    "row 1"]),
    "num_workers_negative": ("step8", ["--num_workers", -1], ["argument --num_workers", "got -1"]),
    "empty_data_file": ("step8", ["--dataset_name", "{data}/empty"], ["{data}/empty", "no rows", "empty"]),
    "learning_rate_negative": ("step9", ["--learning_rate", -1], ["argument --learning_rate", "got -1"]),
    "model_without_tokenizer": ("step9", ["--model_name", "{model}/no_tokenizer"],
                                ["{model}/no_tokenizer", "has no tokenizer", "tokenizer.json"]),
    "omp_num_threads_abc": ("step10", ["--omp_num_threads", "abc"], ["argument --omp_num_threads", "'abc'"]),
    "not_llama": ("step10", ["--model_name", "{model}/gpt2"], ["{model}/gpt2", "'gpt2' model", "Llama"]),
    "save_every_without_save_dir": ("step10", ["--save_every", 5], ["--save_every needs --save_dir"]),
    "keep_last_without_save_dir": ("step11", ["--keep_last", 3], ["--keep_last needs --save_dir"]),
    "zero_stage_4": ("step12", ["--zero_stage", 4], ["argument --zero_stage", "invalid choice: 4", "0, 1, 2, 3"]),
}


@pytest.fixture(scope="module")
def broken_inputs(tmp_path_factory):
    """{dir}, {data} and {model} of PLAIN_CASES."""
    root = tmp_path_factory.mktemp("broken")
    data, model = root / "data", root / "model"
    rows = {"no_text": [{"story": "a"}, {"story": "b"}], "null_text": [{"text": "a b"}, {"text": None}, {"text": "c"}],
            "empty": []}
    for name, lines in rows.items():
        (data / name).mkdir(parents=True)
        (data / name / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (model / "no_tokenizer").mkdir(parents=True)
    (model / "no_tokenizer" / "config.json").write_text((ROOT / "assets" / "tiny_llama" / "config.json").read_text())
    transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2).save_pretrained(model / "gpt2")
    return {"dir": str(root), "data": str(data), "model": str(model)}


@pytest.fixture(scope="module")
def outcomes(torchrun, tmp_path_factory, broken_inputs):
    tiny_corpus = write_corpus(tmp_path_factory.mktemp("tiny_corpus"), [f"story number {i} is short." for i in range(5)])
    cases = {name: (step, nproc, args, words, False) for name, (step, nproc, args, words) in CASES.items()}
    cases["dataset_too_small"] = ("step5", 2, ["--dataset_name", tiny_corpus, "--dp_size", 2, "--seq_len", 8,
                                               "--micro_batch_size", 4, "--gradient_accumulation_steps", 2],
                                  ["fewer than one global batch", "micro_batch_size 4", "gradient_accumulation_steps 2",
                                   "dp_size 2 = 16"], False)
    for name, (step, args, words) in PLAIN_CASES.items():
        args = [str(arg).format(**broken_inputs) for arg in args]
        cases[name] = (step, 1, args, [word.format(**broken_inputs) for word in words], True)

    def launch(item):
        name, (step, nproc, args, words, plain) = item
        start = time.time()
        max_tokens = [] if "--max_tokens" in args else ["--max_tokens", 64]
        run = torchrun(step, nproc, *args, *max_tokens, cached=False, timeout=120, plain=plain)
        return name, (run, time.time() - start, words)

    # Two launches at a time: each is mostly interpreter start-up, so they overlap well on two cores.
    return dict(concurrently(launch, cases.items()))


@pytest.mark.parametrize("name", [*CASES, "dataset_too_small", *PLAIN_CASES])
def test_bad_input_fails_fast_with_a_clear_line(outcomes, name):
    run, seconds, words = outcomes[name]
    assert run.returncode != 0, run
    assert seconds < 60, seconds
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, run  # one line, not one per rank
    for word in words:
        assert word in error_lines[0], (word, error_lines[0])
    assert "Step: 1" not in run.stdout
    if name in PLAIN_CASES:  # no torchrun, whose ChildFailedError report follows our line
        assert "Traceback" not in run.stderr, run


# An out-of-range value for every numeric flag: each step must refuse it while parsing, naming the flag and value.
BAD_NUMBERS = {"--omp_num_threads": "0", "--num_hidden_layers": "0", "--num_attention_heads": "0",
               "--num_key_value_heads": "-2", "--num_workers": "-1", "--num_proc": "0", "--learning_rate": "nan",
               "--seq_len": "-1", "--micro_batch_size": "0", "--gradient_accumulation_steps": "0", "--max_tokens": "0",
               "--tp_size": "0", "--dp_size": "-1", "--pp_size": "0", "--cp_size": "0", "--bucket_size_mb": "-0.5",
               "--peak_tflops": "0", "--timeout_s": "inf", "--save_every": "-1", "--keep_last": "0",
               "--zero_stage": "4", "--max_grad_norm": "-1", "--weight_decay": "-0.1", "--warmup_steps": "-5"}


def parser_of(step, monkeypatch):
    """The step's argparse parser, as its parse_args() builds it."""
    train = import_step(step, "train")
    parsers = []
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a, **k: parsers.append(self))
    train.parse_args()
    monkeypatch.undo()
    return parsers[0]


@pytest.mark.parametrize("step", STEPS)
def test_every_numeric_flag_refuses_values_out_of_range(step, monkeypatch, capsys):
    parser = parser_of(step, monkeypatch)
    flags = {option: action for action in parser._actions for option in action.option_strings}
    # no plain int/float flag slips past the checks (the seed may be any integer; --zero_stage has its choices)
    unchecked = [option for option, action in flags.items()
                 if action.type in (int, float) and option != "--seed" and not action.choices]
    assert unchecked == [], unchecked
    tried = 0
    for flag, value in BAD_NUMBERS.items():
        if flag not in flags:
            continue
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([flag, value])
        assert exit_info.value.code == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: argument {flag}: ") and value in error, (flag, error)
        tried += 1
    assert tried >= 9, tried  # step 1 has the fewest numeric flags (9)


@pytest.fixture(scope="module")
def good_runs(torchrun):
    """The runs of this module that must train, one process each, two at a time: the parity baseline once with
    torchrun and once as `python step3_dataloader/train.py`; a sequence longer than the model declares; a warm-up
    longer than the run."""
    args = ["--seq_len", 32, "--learning_rate", 1e-3, "--gradient_accumulation_steps", 2, "--max_tokens", 20 * 4 * 32,
            "--micro_batch_size", 2]
    launches = {"plain": (("step3", 1, *args), True), "launched": (("step3", 1, *args), False),
                "long_sequence": (("step2", 1, "--seq_len", 1100, "--micro_batch_size", 1, "--max_tokens", 1100), True),
                "long_warm_up": (("step12", 1, "--warmup_steps", 50, "--max_tokens", 2 * 1024, "--seq_len", 64), True)}

    def launch(item):
        name, (launch, plain) = item
        return name, torchrun(*launch, plain=plain)

    return dict(concurrently(launch, launches.items()))


def test_python_train_py_without_torchrun_trains_like_torchrun(good_runs):
    plain, launched = good_runs["plain"], good_runs["launched"]
    assert plain.returncode == 0, plain
    assert launched.returncode == 0, launched
    assert len(plain.losses) == 20 and plain.losses[-1] < plain.losses[0] - 1.0, plain.losses
    assert plain.losses == launched.losses


def test_a_sequence_longer_than_the_model_declares_is_allowed_with_one_warning(good_runs):
    run = good_runs["long_sequence"]
    assert run.returncode == 0, run
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "--seq_len 1100" in warnings[0] and "max_position_embeddings 1024" in warnings[0]
    assert re.search(r"^Step: 1 \| Loss: \d", run.stdout, flags=re.M), run


def test_step_11_says_that_zero_stage_3_is_step_12(monkeypatch, capsys):
    parser = parser_of("step11", monkeypatch)
    with pytest.raises(SystemExit):
        parser.parse_args(["--zero_stage", "3"])
    assert capsys.readouterr().err.strip() == ("error: argument --zero_stage: stage 3 (the parameters sharded too) is "
                                               "step 12: step12_fsdp/train.py (see --help)")


@pytest.mark.parametrize("step", ["step11", "step12"])
def test_a_zero_stage_with_nothing_to_shard_over_says_so_and_runs_as_stage_0(step, monkeypatch, capsys):
    train, utils = import_step(step, "train", "utils")
    monkeypatch.setattr(sys, "argv", ["train.py", "--zero_stage", "2", "--tp_size", "2"])
    args = train.parse_args()
    train.check_command_line(args, utils.load_config(args), world_size=2)
    assert args.zero_stage == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: --zero_stage 2 with dp_size x cp_size = 1: there is no other rank to shard over, so the run is "
        "stage 0"]


def test_a_warm_up_longer_than_the_run_is_allowed_with_one_warning(good_runs):
    """A short try of a long run's settings: allowed (the learning rate only rises), and said once."""
    run = good_runs["long_warm_up"]
    assert run.returncode == 0, run
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: --warmup_steps 50 is beyond the run's last step 4: the learning rate only rises, "
                        "to 8% of --learning_rate"], run.stderr
    assert run.lrs == pytest.approx([1e-3 * step / 50 for step in (1, 2, 3, 4)])


@pytest.mark.parametrize("step", ["step1", "step11"])
def test_a_scaled_rotary_embedding_is_refused_by_name(step, tmp_path, capsys):
    """Llama 3 configs scale their rotary embedding (rope_type "llama3"), which the model does not implement."""
    config = transformers.AutoConfig.from_pretrained(ROOT / "assets" / "tiny_llama")
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config.save_pretrained(tmp_path)
    utils = import_step(step, "utils")
    with pytest.raises(SystemExit):
        utils.load_config(argparse.Namespace(model_name=str(tmp_path), seq_len=32))
    assert f"error: model '{tmp_path}' uses rope_type 'llama3'" in capsys.readouterr().err
