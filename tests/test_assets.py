"""The embedded offline defaults in assets/ load offline, fit together, and are up to date."""

import os

# The assets exist so that nothing needs the hub: prove it by forbidding it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "assets" / "tiny_llama"
CORPUS_DIR = ROOT / "assets" / "tiny_stories"
MAKE_ASSETS = ROOT / "tools" / "make_assets.py"

NUM_STORIES = 4700


@pytest.fixture(scope="module")
def config():
    return transformers.AutoConfig.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return datasets.load_dataset(str(CORPUS_DIR), cache_dir=str(tmp_path_factory.mktemp("hf")))


def test_config_has_the_tiny_llama_sizes(config):
    assert config.model_type == "llama"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (4096, 256, 768)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (4, 8, 4)
    assert config.max_position_embeddings == 1024
    assert config.tie_word_embeddings is False
    # transformers >= 5 moves rope_theta into rope_parameters
    rope_theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    assert rope_theta == 10000.0


def test_config_builds_a_llama(config):
    model = transformers.LlamaForCausalLM(config)
    # untied embeddings 2*4096*256, 4 layers of (q,o 256x256; k,v 256x128; mlp 3x256x768;
    # 2 norms), final norm
    per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768 + 2 * 256
    assert sum(p.numel() for p in model.parameters()) == 2 * 4096 * 256 + 4 * per_layer + 256
    logits = model(torch.tensor([[1, 500, 4095]])).logits
    assert logits.shape == (1, 3, 4096)


def test_tokenizer_matches_config(tokenizer, config):
    assert tokenizer.is_fast
    assert len(tokenizer) == 4096
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)


@pytest.mark.parametrize("text", [
    "Once upon a time, Lily found a shiny red ball in the park.",
    '"Oh no!" said Tom.\n\nThey  looked   everywhere.',
    "Zürich, naïve café, 数学, and an emoji 🎈 were never in the corpus.",
])
def test_tokenizer_round_trips_text_without_adding_special_tokens(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_compresses_the_corpus(tokenizer, corpus):
    # Measured: 4.25 chars/token. The same BPE trained with 2048 tokens gets 3.74, with
    # 1024 gets 3.05, and raw bytes get 1.
    sample = corpus["train"]["text"][:500]
    num_tokens = sum(len(tokenizer(text)["input_ids"]) for text in sample)
    assert sum(len(text) for text in sample) / num_tokens > 4.0


def test_corpus_is_one_train_split_of_varied_stories(corpus):
    assert list(corpus) == ["train"]
    stories = corpus["train"]
    assert stories.column_names == ["text"]
    assert stories.num_rows == NUM_STORIES
    texts = stories["text"]
    assert len(set(texts)) == NUM_STORIES
    assert 3_000_000 < sum(len(text.encode()) for text in texts) < 5_000_000
    words_per_story = [len(text.split()) for text in texts]
    assert 80 <= min(words_per_story) and max(words_per_story) <= 300
    distinct_words = {word for text in texts for word in re.findall(r"[a-z]+", text.lower())}
    assert len(distinct_words) > 2000  # measured: 2366


def run_make_assets(*args):
    return subprocess.run([sys.executable, str(MAKE_ASSETS), *args],
                          capture_output=True, text=True, timeout=120)


def test_committed_assets_are_what_the_script_makes():
    result = run_make_assets("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_names_a_stale_file(tmp_path):
    for name in ("tiny_llama", "tiny_mixtral", "tiny_stories"):
        shutil.copytree(ROOT / "assets" / name, tmp_path / name)
    config_file = tmp_path / "tiny_llama" / "config.json"
    config_file.write_text(config_file.read_text().replace('"hidden_size": 256', '"hidden_size": 512'))

    result = run_make_assets("--check", "--out", str(tmp_path))
    assert result.returncode != 0
    assert "differs: tiny_llama/config.json" in result.stdout
    assert "tokenizer.json" not in result.stdout
