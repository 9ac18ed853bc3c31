import numpy as np
import pytest
import torch

from nsa_dist.data.sources import DataConfig, PasskeyTask, WindowSampler, build_source, load_token_file


def source(cfg, seed=0, vocab_size=256, split="train"):
    return build_source(cfg, vocab_size=vocab_size, generator=torch.Generator().manual_seed(seed), split=split)


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
    sampler = source(DataConfig(kind="text", seq_len=64, path=str(path), holdout=0.2))
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
    with pytest.raises(ValueError, match=r"train split .* holds 61 bytes, fewer than data\.seq_len \+ 1 = 65"):
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


def test_text_holds_out_its_tail(tmp_path):
    text = bytes(range(256)) * 8  # every window names where it starts
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    cfg = DataConfig(kind="text", seq_len=32, path=str(path), holdout=0.25)
    cut = len(text) - 512
    train, held_out = source(cfg).sample(64), source(cfg, split="eval").sample(64)
    for batch, lo, hi in ((train, 0, cut), (held_out, cut, len(text))):
        for inputs, targets in zip(batch.inputs, batch.targets):
            window = bytes(inputs.tolist()) + bytes(targets[-1:].tolist())
            assert window in text[lo:hi]
    with pytest.raises(ValueError, match=r"eval split .*last 25%\) holds 512 bytes, fewer than data\.seq_len \+ 1"):
        source(DataConfig(kind="text", seq_len=512, path=str(path), holdout=0.25), split="eval")


def write_documents(root, count):
    """`count` files, each one letter repeated, so a window names the files it came from."""
    for i in range(count):
        sub = root / ("pkg" if i % 2 else "") / f"doc{i:02d}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_bytes(bytes([65 + i]) * (200 + 10 * i))
    (root / "notes.txt").write_bytes(b"z" * 500)  # outside data.glob


def letters(batch):
    return {b for row in torch.cat([batch.inputs, batch.targets[:, -1:]], 1) for b in row.tolist()}


def test_a_directory_splits_by_document_and_eval_reads_only_held_out_ones(tmp_path):
    from nsa_dist.data.corpus import SEPARATOR, held_out_score, split_documents

    write_documents(tmp_path, 20)
    cfg = DataConfig(kind="files", seq_len=64, path=str(tmp_path), glob="**/*.py", holdout=0.25)
    train, held_out = source(cfg), source(cfg, split="eval")
    assert not set(train.documents) & set(held_out.documents)
    assert sorted(train.documents + held_out.documents) == sorted(
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py"))
    assert list(held_out.documents) == sorted(n for n in held_out.documents)
    assert all(held_out_score(n) < 0.25 for n in held_out.documents) and held_out.documents
    # the split is the documents joined in path order, each followed by the separator
    assert bytes(held_out.tokens) == b"".join((tmp_path / n).read_bytes() + bytes([SEPARATOR])
                                              for n in held_out.documents)
    held_letters = {(tmp_path / n).read_bytes()[0] for n in held_out.documents}
    assert letters(held_out.sample(64)) <= held_letters | {SEPARATOR}
    assert not letters(train.sample(64)) & held_letters
    # the same split whatever else is in the directory: a document's side depends on its own path alone
    (tmp_path / "new.py").write_bytes(b"n" * 300)
    assert set(held_out.documents) <= set(source(cfg, split="eval").documents)
    # both sides get a document, whatever the share
    names = [f"f{i}.py" for i in range(3)]
    assert all(split_documents(names, share)["eval"] and split_documents(names, share)["train"]
               for share in (1e-9, 0.5, 1 - 1e-9))


def test_the_directory_reader_refuses_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"'.*empty' is empty: point data\.path at a directory"):
        source(DataConfig(kind="files", path=str(empty)))
    write_documents(tmp_path / "docs", 4)
    with pytest.raises(ValueError, match=r"has no file matching data\.glob='\*\*/\*\.md'.*change data\.glob"):
        source(DataConfig(kind="files", path=str(tmp_path / "docs"), glob="**/*.md"))
    with pytest.raises(ValueError, match=r"has one file matching data\.glob='\*\.txt' \(notes\.txt\).*data=text"):
        source(DataConfig(kind="files", path=str(tmp_path / "docs"), glob="*.txt"))
    with pytest.raises(ValueError, match=r"eval split .* holds \d+ bytes, fewer than data\.seq_len \+ 1 = 513"):
        source(DataConfig(kind="files", path=str(tmp_path / "docs"), glob="**/*.py"), split="eval")
    with pytest.raises(FileNotFoundError, match="data=files reads a directory"):
        DataConfig(kind="files", path=str(tmp_path / "docs" / "doc00.py"))
    with pytest.raises(ValueError, match=r"data\.holdout .* in \(0, 1\)"):
        DataConfig(kind="files", path=str(tmp_path), holdout=0.0)


def test_data_stdlib_reads_the_standard_library_with_a_held_out_split(compose_config):
    import sysconfig

    from nsa_dist.config import run_config

    run = run_config(compose_config("data=stdlib", "data.seq_len=1024"))
    assert run.data.kind == "files" and run.data.path == sysconfig.get_paths()["stdlib"]
    held_out = source(run.data, split="eval")
    assert held_out.documents and not any(n.startswith("site-packages/") for n in held_out.documents)
    assert all(n.endswith(".py") for n in held_out.documents)
