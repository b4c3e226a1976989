"""Data loading through `datasets`, cleaning and filtering, token batching, padding and masks, config and vocab."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nmt.config import CorpusSpec, DataConfig, VocabConfig, config_from_dict, load_config
from nmt.data import (Batch, TokenBatcher, filter_for_training, load_parallel, load_training, pad, read_lines,
                      source_tags, tokenize)
from nmt.errors import NMTError
from nmt.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab, train_vocab


@pytest.fixture(scope="module")
def small_vocab(toy_corpus) -> Vocab:
    lines = (toy_corpus / "train.src").read_text().splitlines()
    return train_vocab(VocabConfig(size=24), lines, lines)


def test_file_pairs_keep_every_line_in_order_including_empty_ones(tmp_path):
    (tmp_path / "a.src").write_text("one\n\n  \nfour\n")
    (tmp_path / "a.tgt").write_text("uno\ndos\n\ncuatro\n")
    table = load_parallel(CorpusSpec(src=str(tmp_path / "a.src"), tgt=str(tmp_path / "a.tgt")))
    assert table["src"] == ["one", "", "  ", "four"] and table["tgt"] == ["uno", "dos", "", "cuatro"]


def test_misaligned_and_invalid_utf8_corpora_are_one_line_errors(tmp_path):
    (tmp_path / "a.src").write_text("one\ntwo\n")
    (tmp_path / "a.tgt").write_text("uno\n")
    with pytest.raises(NMTError, match="misaligned corpus: .* 2 lines, .* 1"):
        load_parallel(CorpusSpec(src=str(tmp_path / "a.src"), tgt=str(tmp_path / "a.tgt")))
    (tmp_path / "b.tgt").write_bytes(b"uno\nd\xffos\n")
    with pytest.raises(NMTError, match="line 2 is not valid UTF-8"):
        load_parallel(CorpusSpec(src=str(tmp_path / "a.src"), tgt=str(tmp_path / "b.tgt")))


def test_tsv_jsonl_and_parquet_files_load_with_named_columns(tmp_path):
    (tmp_path / "c.tsv").write_text('es\ten\nhola "amigo"\thello "friend"\nadiós\tbye\n')
    table = load_parallel(CorpusSpec(path=str(tmp_path / "c.tsv"), src_column="es", tgt_column="en"))
    assert table["src"] == ['hola "amigo"', "adiós"] and table["tgt"] == ['hello "friend"', "bye"]
    rows = [{"de": "Hallo", "en": "hello"}, {"de": "Welt", "en": None}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = load_parallel(CorpusSpec(path=str(tmp_path / "d.jsonl"), src_column="de", tgt_column="en"))
    assert table["src"] == ["Hallo", "Welt"] and table["tgt"] == ["hello", ""]
    table.to_parquet(str(tmp_path / "e.parquet"))
    assert load_parallel(CorpusSpec(path=str(tmp_path / "e.parquet"), limit=1))["src"] == ["Hallo"]
    with pytest.raises(NMTError, match="no column 'fr'"):
        load_parallel(CorpusSpec(path=str(tmp_path / "d.jsonl"), src_column="fr", tgt_column="en"))


def test_a_saved_dataset_with_translation_pairs_loads_like_a_hub_corpus(tmp_path):
    import datasets

    rows = {"translation": [{"de": "Hallo Welt", "en": "hello world"}, {"de": "gut", "en": "good"}]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    spec = CorpusSpec(hub=str(tmp_path / "saved"), split="train", src_lang="de", tgt_lang="en")
    table = load_parallel(spec)
    assert table["src"] == ["Hallo Welt", "gut"] and table["tgt"] == ["hello world", "good"]
    with pytest.raises(NMTError, match="languages"):
        load_parallel(CorpusSpec(hub=str(tmp_path / "saved"), src_lang="fr", tgt_lang="en"))
    with pytest.raises(NMTError, match="no split 'test'"):
        load_parallel(CorpusSpec(hub=str(tmp_path / "saved"), split="test", src_lang="de", tgt_lang="en"))


def test_tokenizing_and_length_filtering(tmp_path, small_vocab):
    (tmp_path / "f.src").write_text("a b c\n\na b c d e f g h i j k l a b c d e f g h i j k l\nb\nc d\n")
    (tmp_path / "f.tgt").write_text("c b a\nx\nl\nb c d e f g h i j\nd c\n")
    table = tokenize(load_parallel(CorpusSpec(src=str(tmp_path / "f.src"), tgt=str(tmp_path / "f.tgt"))), small_vocab)
    assert table["src_ids"][0] == small_vocab.encode_src(["a b c"])[0]
    kept = filter_for_training(table, DataConfig(max_len=12, max_len_ratio=3.0))
    # dropped: an empty source, a source over max_len, a 1-piece source against a 9-piece target (ratio)
    assert kept["src"] == ["a b c", "c d"]


def test_token_batches_respect_the_budget_cover_every_example_and_depend_only_on_seed_and_epoch():
    rng = np.random.default_rng(0)
    src = rng.integers(1, 40, 5000)
    tgt = np.clip(src + rng.integers(-3, 4, 5000), 1, None)  # correlated lengths, as in real corpora
    batcher = TokenBatcher(src, tgt, batch_tokens=600, seed=3)
    batches = batcher.epoch(0)
    assert sorted(i for b in batches for i in b) == list(range(5000))
    for b in batches:
        assert len(b) == 1 or (max(src[b]) + 1 + max(tgt[b]) + 1) * len(b) <= 600
    assert batcher.epoch(0) == batches and batcher.epoch(1) != batches
    assert TokenBatcher(src, tgt, 600, seed=4).epoch(0) != batches
    padded = sum((max(src[b]) + max(tgt[b]) + 2) * len(b) for b in batches)
    assert padded / (src.sum() + tgt.sum() + 2 * 5000) < 1.1  # length bucketing keeps padding low


def test_ranks_get_disjoint_equal_shares_of_the_same_batches():
    rng = np.random.default_rng(1)
    src, tgt = rng.integers(1, 30, 999), rng.integers(1, 30, 999)
    everything = TokenBatcher(src, tgt, 500, seed=1).epoch(2)
    shards = [TokenBatcher(src, tgt, 500, seed=1, rank=r, world_size=3).epoch(2) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    flat = [tuple(b) for s in shards for b in s]
    assert len(set(flat)) == len(flat) and set(flat) <= {tuple(b) for b in everything}


def test_batches_pad_with_bos_eos_and_masks_follow_lengths():
    batch = Batch.from_ids([[5, 6, 7], [8]], [[9], [10, 11]])
    assert batch.src.tolist() == [[5, 6, 7, EOS_ID], [8, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.src_lengths.tolist() == [4, 2]
    assert batch.tgt_in.tolist() == [[BOS_ID, 9, PAD_ID], [BOS_ID, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, EOS_ID, PAD_ID], [10, 11, EOS_ID]]
    assert batch.n_tgt_tokens == 5
    padded, lengths = pad([[4], [4, 5, 6]])
    assert padded.tolist() == [[4, 0, 0], [4, 5, 6]] and lengths.tolist() == [1, 3]


def test_read_lines_never_merges_or_drops_lines(tmp_path):
    (tmp_path / "x").write_bytes(b"a\r\n\nb\xff\nlast")
    assert read_lines(tmp_path / "x") == ["a", "", "b\ufffd", "last"]


def test_vocab_reserves_special_ids_and_round_trips(tmp_path, toy_corpus):
    lines = (toy_corpus / "train.src").read_text().splitlines()
    joint = train_vocab(VocabConfig(size=24, type="unigram"), lines, lines)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert joint.tgt_pieces([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]
    assert joint.decode_tgt(joint.encode_tgt(["a b c"])[0] + [EOS_ID, PAD_ID]) == "a b c"
    joint.save(tmp_path / "j")
    assert Vocab.load(tmp_path / "j").joint and (tmp_path / "j/spm.model").is_file()
    upper = [line.upper() for line in lines]
    separate = train_vocab(VocabConfig(size=24, joint=False), lines, upper)
    assert not separate.joint
    separate.save(tmp_path / "s")
    loaded = Vocab.load(tmp_path / "s")
    assert loaded.decode_tgt(loaded.encode_tgt(["A B"])[0]) == "A B"
    assert Vocab.from_state(separate.to_state()).tgt_model == separate.tgt_model
    with pytest.raises(NMTError, match="no text"):
        train_vocab(VocabConfig(), ["", " "], ["x"])
    with pytest.raises(NMTError, match="no SentencePiece model"):
        Vocab.load(tmp_path)


def test_an_output_map_restricts_target_ids_to_the_training_targets_pieces(tmp_path):
    src = ["uno dos tres", "cuatro cinco"]
    tgt = ["one two three", "four five"]
    full = train_vocab(VocabConfig(size=60), src, tgt)
    restricted = full.restricted_to(full.encode_tgt(tgt))
    seen = {i for ids in full.encode_tgt(tgt) for i in ids}
    assert restricted.output_ids[:4] == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert set(restricted.output_ids[4:]) == seen and restricted.tgt_size == len(seen) + 4 < full.tgt_size
    assert restricted.src_size == full.src_size  # the source side keeps every piece
    ids = restricted.encode_tgt(["one five"])[0]
    assert max(ids) < restricted.tgt_size and restricted.decode_tgt(ids + [EOS_ID]) == "one five"
    assert restricted.tgt_pieces(ids) == full.tgt_pieces(full.encode_tgt(["one five"])[0])
    assert UNK_ID in restricted.encode_tgt(["dos"])[0]  # a piece never seen on the target side
    restricted.save(tmp_path / "v")
    for copy in (Vocab.load(tmp_path / "v"), Vocab.from_state(restricted.to_state())):
        assert copy.output_ids == restricted.output_ids and copy.encode_tgt(["one five"])[0] == ids
    assert full.fingerprint() != restricted.fingerprint()
    (tmp_path / "v" / "output_ids.json").write_text('{"sentencepiece_ids": [0, 1, 2]}')
    with pytest.raises(NMTError, match="output map"):
        Vocab.load(tmp_path / "v")


def test_config_overrides_types_and_relative_paths(tmp_path, toy_corpus):
    (tmp_path / "corpus").symlink_to(toy_corpus)
    (tmp_path / "c.yaml").write_text("data:\n  train: {src: corpus/train.src, tgt: corpus/train.tgt}\n"
                                     "train: {out_dir: runs/x, lr: 1}\n")
    config = load_config(tmp_path / "c.yaml", ["model.dropout=0.5", "train.amp=true", "decode.beam_size=3"])
    assert config.data.train.src == str(tmp_path / "corpus/train.src")
    assert config.train.out_dir == str(tmp_path / "runs/x")
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.dropout == 0.5 and config.train.amp == "bf16" and config.decode.beam_size == 3
    with pytest.raises(NMTError, match="decode.nbest"):
        load_config(tmp_path / "c.yaml", ["decode.nbest=9"])
    with pytest.raises(NMTError, match="exactly one of src"):
        load_config(tmp_path / "c.yaml", ["data.dev.path=corpus/dev.src", "data.dev.src=corpus/dev.src"])


def test_padding_does_not_change_a_sentence_s_encoding_or_decoding():
    from conftest import tiny_random_model

    model = tiny_random_model(vocab_size=12, seed=4)
    alone, alone_len = pad([[5, 6, 7, 8]], suffix=EOS_ID)
    batch, batch_len = pad([[5, 6, 7, 8], [9, 10, 11, 5, 6, 7, 8, 9]], suffix=EOS_ID)
    with torch.no_grad():
        a = model.encode_tensors(alone, alone_len)
        b = model.encode_tensors(batch, batch_len)
        assert torch.allclose(a[0][0], b[0][0, :5], atol=1e-6)  # memory
        assert torch.allclose(a[3][0], b[3][0], atol=1e-6)  # initial decoder state
        assert not b[2][0, 5:].any()  # mask is False on padding
        tgt = torch.tensor([[BOS_ID, 5, 6]])
        logits_alone = model.logits(alone, alone_len, tgt)
        logits_batch = model.logits(batch, batch_len, torch.cat([tgt, tgt]))
        assert torch.allclose(logits_alone[0], logits_batch[0], atol=1e-5)


def test_initialization_is_xavier_with_zero_biases_and_lstm_forget_bias_one():
    from conftest import tiny_random_model

    sizes = {"embed_dim": 64, "encoder_hidden": 64, "decoder_hidden": 64}
    model = tiny_random_model(vocab_size=50, rnn_type="lstm", rnn_init="xavier", **sizes)
    hh = model.decoder.cells[0].bias_hh
    assert torch.all(hh[64:128] == 1) and torch.all(hh[:64] == 0) and torch.all(hh[128:] == 0)
    weight = model.decoder.att_layer.weight
    bound = (6 / sum(weight.shape)) ** 0.5
    assert weight.abs().max() <= bound and weight.abs().max() > 0.8 * bound
    assert torch.all(model.decoder.att_layer.bias == 0) and torch.all(model.encoder.embed.weight[PAD_ID] == 0)
    gru = tiny_random_model(vocab_size=50, rnn_init="xavier")
    assert torch.all(gru.encoder.layers[0][0].bias_ih_l0 == 0)


def test_default_recurrent_initialization_is_uniform_over_one_over_root_h():
    from conftest import tiny_random_model

    model = tiny_random_model(vocab_size=50, encoder_hidden=64, decoder_hidden=100, rnn_type="lstm")
    for param, hidden in ((model.encoder.layers[0][1].weight_hh_l0, 64), (model.decoder.cells[0].weight_ih, 100),
                          (model.decoder.cells[0].bias_ih[:100], 100)):
        assert param.abs().max() <= hidden ** -0.5 and param.abs().max() > 0.9 * hidden ** -0.5
    assert torch.all(model.decoder.cells[0].bias_hh[100:200] == 1)  # the forget gate starts open
    assert torch.all(model.decoder.att_layer.bias == 0)


def test_a_key_given_twice_in_a_config_is_a_one_line_error(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(NMTError, match="'lr' given twice"):
        load_config(tmp_path / "c.yaml")


def test_no_training_pair_left_says_how_many_were_dropped_and_why(tmp_path, small_vocab):
    (tmp_path / "s").write_text("a b c d e f g h\n\n" * 3)
    (tmp_path / "t").write_text("a\nb\n" * 3)
    table = tokenize(load_parallel(CorpusSpec(src=str(tmp_path / "s"), tgt=str(tmp_path / "t"))), small_vocab)
    with pytest.raises(NMTError, match=r"all 6 were dropped") as error:
        filter_for_training(table, DataConfig(max_len_ratio=2.0))
    assert "3 with an empty side" in str(error.value) and "3 with a length ratio above" in str(error.value)


def test_a_vocabulary_smaller_than_asked_for_is_a_warning(toy_corpus, capsys):
    lines = (toy_corpus / "train.src").read_text().splitlines()
    vocab = train_vocab(VocabConfig(size=500), lines, lines)
    assert vocab.src_size < 500
    assert f"warning: vocab.size 500 asked for, but SentencePiece built {vocab.src_size} pieces" in capsys.readouterr().err


def test_a_tagged_extra_corpus_follows_the_training_pairs_and_its_tag_is_one_source_piece(tmp_path):
    for name, src, tgt in (("a", "one two\nthree\n", "uno dos\ntres\n"), ("b", "four\n\n", "cuatro\nx\n")):
        (tmp_path / f"{name}.src").write_text(src)
        (tmp_path / f"{name}.tgt").write_text(tgt)
    spec = {name: CorpusSpec(src=str(tmp_path / f"{name}.src"), tgt=str(tmp_path / f"{name}.tgt")) for name in "ab"}
    data = DataConfig(train=spec["a"], extra_train=(CorpusSpec(**{**spec["b"].__dict__, "src_prefix": "<2b>"}),))
    table = load_training(data)
    assert table["src"] == ["one two", "three", "<2b> four", ""]  # an empty line stays empty (filtered later)
    assert table["tgt"] == ["uno dos", "tres", "cuatro", "x"]
    assert source_tags(data) == ["<2b>"] and source_tags(DataConfig(train=spec["a"])) == []
    tagged = train_vocab(VocabConfig(size=40), table["src"], table["tgt"], source_tags(data))
    assert "<2b>" in tagged.src_pieces(tagged.encode_src(["<2b> four"])[0])
    plain = train_vocab(VocabConfig(size=40), table["src"], table["tgt"])
    assert "<2b>" not in plain.src_pieces(plain.encode_src(["<2b> four"])[0])


@pytest.mark.parametrize("data, message", [
    ({"train": {"src": "a", "tgt": "b", "src_prefix": "<2 b>"}}, "data.train.src_prefix: must be one token"),
    ({"extra_train": [{"src": "a", "tgt": "b"}]}, "data.extra_train: needs data.train"),
    ({"train": {"src": "a", "tgt": "b"}, "extra_train": [{"src": "a"}]}, r"data.extra_train\[0\]: both src and tgt"),
])
def test_bad_extra_training_corpora_are_one_line_errors(data, message):
    with pytest.raises(NMTError, match=message):
        config_from_dict({"data": data}, check_files=False)
