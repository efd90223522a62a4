"""Memory estimates from a hand-made GGUF header: the arithmetic, the GPU fit, and bad input."""

from __future__ import annotations

import pytest

from cyllama_cffi.memory import MemoryEstimate, estimate_gpu_layers, estimate_memory_usage, parse_gpu_memory

from .gguf_bytes import ARRAY, STRING, UINT32, gguf, tensor_info

MiB = 1024 * 1024
N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_VOCAB = 4, 256, 512, 8, 2, 1000
F32, F16, Q8_0 = 0, 1, 8


def write_model(path, **overrides):
    """A llama-shaped header: per layer an f16 attention and a q8_0 FFN weight; f32 embeddings."""
    meta = {"general.architecture": (STRING, "llama"), "llama.block_count": (UINT32, N_LAYER),
            "llama.embedding_length": (UINT32, N_EMBD), "llama.feed_forward_length": (UINT32, N_FF),
            "llama.attention.head_count": (UINT32, N_HEAD), "llama.attention.head_count_kv": (UINT32, N_HEAD_KV),
            "llama.context_length": (UINT32, 4096),
            "tokenizer.ggml.tokens": (ARRAY, (STRING, [f"t{i}" for i in range(N_VOCAB)]))}
    meta.update(overrides)
    kvs = [(key, kind, content) for key, (kind, content) in meta.items() if kind is not None]
    tensors = [tensor_info("token_embd.weight", [N_EMBD, N_VOCAB], F32)]
    for layer in range(N_LAYER):
        tensors.append(tensor_info(f"blk.{layer}.attn_q.weight", [N_EMBD, N_EMBD], F16))
        tensors.append(tensor_info(f"blk.{layer}.ffn_up.weight", [N_EMBD, N_FF], Q8_0))
    path.write_bytes(gguf(kvs, tensors))
    return path


LAYER_BYTES = N_EMBD * N_EMBD * 2 + N_EMBD * N_FF // 32 * 34
EMBED_BYTES = N_EMBD * N_VOCAB * 4
KV_WIDTH = N_HEAD_KV * (N_EMBD // N_HEAD) * 2  # K and V elements per cell per layer


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "m.gguf")


def test_usage_is_weights_kv_and_graph(model):
    usage = estimate_memory_usage(model, ctx_size=1000)
    cells = 1024  # rounded up to 256 as llama.cpp does
    assert usage["weights_bytes"] == EMBED_BYTES + N_LAYER * LAYER_BYTES
    assert usage["kv_cache_bytes"] == cells * N_LAYER * KV_WIDTH * 2
    assert usage["graph_bytes"] == 512 * (N_VOCAB + 2 * N_EMBD) * 4
    assert usage["total_bytes"] == usage["weights_bytes"] + usage["kv_cache_bytes"] + usage["graph_bytes"]
    assert usage["parameters"] == {"n_embd": N_EMBD, "n_layer": N_LAYER, "n_ff": N_FF, "n_vocab": N_VOCAB,
                                   "total_params": N_EMBD * N_VOCAB + N_LAYER * (N_EMBD * N_EMBD + N_EMBD * N_FF)}
    assert usage["kv_cache_mb"]["f32"] == 2 * usage["kv_cache_bytes"] // MiB
    assert set(usage["model_size_mb"]) >= {"f32", "f16", "q4_0", "q8_0"}


def test_kv_grows_with_sequences_and_a_small_context_shrinks_the_graph(model):
    one = estimate_memory_usage(model, ctx_size=2048)
    two = estimate_memory_usage(model, ctx_size=2048, batch_size=2)
    assert two["kv_cache_bytes"] == 2 * one["kv_cache_bytes"]
    assert estimate_memory_usage(model, ctx_size=100)["graph_bytes"] == 256 * (N_VOCAB + 2 * N_EMBD) * 4


def test_key_and_value_lengths_override_the_head_size(tmp_path):
    model = write_model(tmp_path / "m.gguf", **{"llama.attention.key_length": (UINT32, 64),
                                                "llama.attention.value_length": (UINT32, 48)})
    assert estimate_memory_usage(model, ctx_size=256)["kv_cache_bytes"] == 256 * N_LAYER * N_HEAD_KV * (64 + 48) * 2


def test_layers_fit_what_the_gpu_holds(model):
    graph = 512 * (N_VOCAB + 2 * N_EMBD) * 4
    kv_layer = 2048 * KV_WIDTH * 2
    per_layer = LAYER_BYTES + kv_layer
    budget_mb = -(-(graph + 2 * per_layer) // MiB)  # room for two layers, not three
    assert graph + 3 * per_layer > budget_mb * MiB
    estimate = estimate_gpu_layers(model, budget_mb, ctx_size=2048)
    assert estimate == MemoryEstimate(layers=2, graph_size=graph, vram=graph + 2 * per_layer, vram_kv=2 * kv_layer,
                                      total_size=EMBED_BYTES + N_LAYER * LAYER_BYTES)
    assert estimate_gpu_layers(model, "16GB").layers == N_LAYER
    assert estimate_gpu_layers(model, 1).layers == 0 and estimate_gpu_layers(model, 1).vram == 0


def test_kv_type_and_parallel_sequences_change_the_fit(model):
    f16 = estimate_gpu_layers(model, "16GB", ctx_size=2048)
    assert estimate_gpu_layers(model, "16GB", ctx_size=2048, kv_cache_type="f32").vram_kv == 2 * f16.vram_kv
    assert estimate_gpu_layers(model, "16GB", ctx_size=2048, kv_cache_type="q8_0").vram_kv == f16.vram_kv * 34 // 64
    assert estimate_gpu_layers(model, "16GB", ctx_size=2048, n_parallel=3).vram_kv == 3 * f16.vram_kv


def test_several_gpus_split_the_layers(model):
    estimate = estimate_gpu_layers(model, [4096, 4096])
    assert estimate.tensor_split == [N_LAYER, 0] and estimate.layers == N_LAYER
    assert estimate_gpu_layers(model, 4096).tensor_split is None


@pytest.mark.parametrize("spec,mb", [(8192, 8192), ("8192", 8192), ("512MB", 512), ("8GB", 8192), ("8 GiB", 8192),
                                     ("1.5gb", 1536), ("2048 MiB", 2048), ("1TB", 1024 * 1024),
                                     ("4096,4096", [4096, 4096]), (["8GB", 1024], [8192, 1024])])
def test_parse_gpu_memory(spec, mb):
    assert parse_gpu_memory(spec) == mb


@pytest.mark.parametrize("spec", ["", "lots", "8 parsecs", "-1", "GB", "8GB,", 0, -5, True, None, 2.5, [], "512KB"])
def test_parse_gpu_memory_refuses_junk(spec):
    with pytest.raises(ValueError):
        parse_gpu_memory(spec)


def test_invalid_input_is_a_value_error(tmp_path, model):
    with pytest.raises(ValueError, match="not found"):
        estimate_memory_usage(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("just some words, long enough for a header")
    with pytest.raises(ValueError, match="not a GGUF"):
        estimate_memory_usage(not_gguf)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(model.read_bytes()[:-30])  # the last tensor's description cut short
    with pytest.raises(ValueError, match="truncated"):
        estimate_memory_usage(truncated)
    for bad in ({"ctx_size": 0}, {"ctx_size": -2048}, {"batch_size": -1}, {"ctx_size": 1.5}):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            estimate_memory_usage(model, **bad)
    with pytest.raises(ValueError, match="kv_cache_type"):
        estimate_gpu_layers(model, 4096, kv_cache_type="f8")
    with pytest.raises(ValueError, match="n_parallel"):
        estimate_gpu_layers(model, 4096, n_parallel=0)
    with pytest.raises(ValueError, match="GPU memory"):
        estimate_gpu_layers(model, -4096)


def test_a_header_without_the_shape_is_a_value_error(tmp_path):
    model = write_model(tmp_path / "m.gguf", **{"llama.block_count": (None, None)})
    with pytest.raises(ValueError, match="llama.block_count"):
        estimate_memory_usage(model)


def test_per_layer_hyperparameters_are_refused_by_name(tmp_path):
    model = write_model(tmp_path / "m.gguf", **{"llama.attention.head_count_kv": (ARRAY, (UINT32, [2] * N_LAYER))})
    with pytest.raises(ValueError, match="head_count_kv is not a single number"):
        estimate_memory_usage(model)


def test_layers_spill_over_to_the_next_gpu(model):
    graph = 512 * (N_VOCAB + 2 * N_EMBD) * 4
    per_layer = LAYER_BYTES + 2048 * KV_WIDTH * 2
    assert per_layer < MiB  # so a 1 MB second GPU takes exactly one layer
    first_mb = -(-(graph + per_layer) // MiB)  # the graph and one layer (no room for two: checked below)
    assert graph + 2 * per_layer > first_mb * MiB
    estimate = estimate_gpu_layers(model, [first_mb, 1], ctx_size=2048)
    assert estimate.tensor_split == [1, 1] and estimate.layers == 2
    assert estimate.vram == graph + 2 * per_layer
