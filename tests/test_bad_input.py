"""Bad input gets a clear error and loses nothing."""

import json

import pytest
import torch

import alora


def test_context_overflow_is_a_clear_error_and_conversation_survives(engine):
    conv = engine.conversation()
    "".join(conv.send("Hello", max_new_tokens=4))
    before = (conv.messages, conv.history_ids)
    with pytest.raises(alora.ContextOverflowError, match="context"):
        conv.send("word " * 9000)
    assert (conv.messages, conv.history_ids) == before
    assert "".join(conv.send("Hi again", max_new_tokens=4))


def test_stopped_stream_keeps_partial_reply_consistently(engine):
    conv = engine.conversation()
    stream = conv.send("Tell me a long story about dragons.", max_new_tokens=50)
    got = "".join(next(stream) for _ in range(3))
    stream.close()
    assert conv.messages[-1] == {"role": "assistant", "content": got}
    # the next turn continues on the cache: history tokens are reused, not recomputed
    "".join(conv.send("Shorter please.", max_new_tokens=4))
    assert conv.stats.reused_tokens > 20 and conv.stats.recomputed_tokens <= 3


def test_unknown_model_path():
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        alora.Engine.from_pretrained("/no/such/model")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(alora.UnsupportedModelError, match="gpt2"):
        alora.Engine.from_pretrained(tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path, tiny_dirs):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(alora.CheckpointError, match="pytorch_model.bin.*refused"):
        alora.Engine.from_pretrained(folder)


def test_corrupt_safetensors_names_the_file(tmp_path, tiny_dirs):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(alora.CheckpointError, match="model.safetensors"):
        alora.Engine.from_pretrained(folder)


def test_missing_tensor_is_named(tmp_path, tiny_dirs):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    state = load_file(tiny_dirs["llama"] / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(alora.CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        alora.Engine.from_pretrained(folder)


def test_bad_sampling_arguments(engine):
    conv = engine.conversation()
    with pytest.raises(ValueError, match="top_p"):
        conv.send("hi", top_p=0)
    with pytest.raises(TypeError):
        conv.send("hi", nonsense=1)
    assert conv.messages == []


def test_conversation_used_from_two_threads_fails_fast(engine):
    import threading

    conv = engine.conversation()
    stream = conv.send("Tell me about cats.", max_new_tokens=30)
    next(stream)
    errors = []

    def other():
        try:
            conv.send("And dogs?")
        except alora.ConversationBusyError as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors and "busy" in str(errors[0])
    rest = "".join(stream)
    assert conv.messages[-1]["role"] == "assistant" and conv.messages[-1]["content"].endswith(rest)
    assert "".join(conv.send("And dogs?", max_new_tokens=4))  # usable once the first call ended
