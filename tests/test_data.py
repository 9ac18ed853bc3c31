import numpy as np
import pytest
import torch

from nsa_dist.data.sources import DataConfig, PasskeyTask, WindowSampler, build_source, load_token_file


def source(cfg, seed=0, vocab_size=256):
    return build_source(cfg, vocab_size=vocab_size, generator=torch.Generator().manual_seed(seed))


def decode(row):
    return bytes(row.tolist()).decode()


def test_passkey_windows_end_on_the_needles_digits():
    batch = source(DataConfig(kind="passkey", seq_len=256, passkey_digits=5)).sample(6)
    assert batch.inputs.shape == batch.targets.shape == batch.answer_mask.shape == (6, 256)
    assert batch.inputs.dtype == torch.int64
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    for i in range(6):
        answer = bytes(batch.targets[i][batch.answer_mask[i]].tolist()).decode()
        assert len(answer) == 5 and answer.isdigit()
        text = decode(batch.inputs[i]) + chr(int(batch.targets[i, -1]))
        assert text.endswith(PasskeyTask.question + answer)
        assert f"The passkey is {answer}. " in text[:-len(PasskeyTask.question + answer)]


def test_passkey_needle_depth_varies():
    batch = source(DataConfig(kind="passkey", seq_len=512)).sample(32)
    depths = {decode(row).index("The passkey is") for row in batch.inputs}
    assert len(depths) > 10


def test_the_generator_makes_the_stream_reproducible_and_resumable():
    cfg = DataConfig(kind="passkey", seq_len=128)
    a, b = source(cfg, seed=3), source(cfg, seed=3)
    assert torch.equal(a.sample(4).inputs, b.sample(4).inputs)
    assert not torch.equal(source(cfg, seed=4).sample(4).inputs, source(cfg, seed=3).sample(4).inputs)
    state = a.state_dict()
    expected = a.sample(4).inputs
    resumed = source(cfg, seed=99)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample(4).inputs, expected)


def test_text_windows_are_slices_of_the_file(tmp_path):
    text = ("The quick brown fox jumps over the lazy dog. " * 40).encode()
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    sampler = source(DataConfig(kind="text", seq_len=64, path=str(path)))
    batch = sampler.sample(5)
    assert batch.answer_mask is None and batch.inputs.shape == (5, 64)
    for inputs, targets in zip(batch.inputs, batch.targets):
        window = bytes(inputs.tolist()) + bytes(targets[-1:].tolist())
        assert window in text


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_token_files_are_memory_mapped(tmp_path, dtype):
    tokens = np.arange(1000, dtype=dtype) % 200
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    assert isinstance(load_token_file(path, dtype), np.memmap)
    batch = source(DataConfig(kind="tokens", seq_len=32, path=str(path), token_dtype=dtype)).sample(3)
    starts = batch.inputs[:, 0]
    expected = (starts[:, None] + torch.arange(33)) % 200
    assert torch.equal(torch.cat([batch.inputs, batch.targets[:, -1:]], 1), expected)


def test_token_ids_beyond_the_vocabulary_are_reported(tmp_path):
    path = tmp_path / "train.bin"
    (np.arange(600, dtype=np.uint16) + 300).tofile(path)
    cfg = DataConfig(kind="tokens", seq_len=16, path=str(path), token_dtype="uint16")
    with pytest.raises(ValueError, match=r"token id \d+, outside model\.vocab_size=256"):
        source(cfg).sample(2)
    assert source(cfg, vocab_size=1024).sample(2).inputs.max() < 1024


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        source(DataConfig(kind="text", seq_len=16, path=str(tmp_path / "missing.txt")))


def test_file_shorter_than_a_window_says_so(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 64)
    with pytest.raises(ValueError, match=r"holds 64 tokens, fewer than data\.seq_len \+ 1 = 65"):
        source(DataConfig(kind="text", seq_len=64, path=str(path)))


def test_odd_byte_count_for_uint16_says_so(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"x" * 101)
    with pytest.raises(ValueError, match="token_dtype"):
        source(DataConfig(kind="tokens", seq_len=16, path=str(path), token_dtype="uint16"))


def test_unknown_kind_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown data\.kind='csv'.*passkey"):
        source(DataConfig(kind="csv"))


def test_window_sampler_needs_enough_tokens():
    with pytest.raises(ValueError, match="fewer than"):
        WindowSampler(np.zeros(10, dtype=np.uint8), seq_len=10, vocab_size=256,
                      generator=torch.Generator(), source="test")
