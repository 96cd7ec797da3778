import torch

from vlfm.data.tokenizer import Tokenizer

CORPUS = ["a small red circle", "a big blue square left of a green triangle", "there is a yellow star"] * 20


def test_round_trip_and_specials(tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    ids, mask = tok(["a small red circle", "A Big Blue Square"], context_length=16)
    assert ids.shape == mask.shape == (2, 16)
    n = int(mask[0].sum())
    assert ids[0, 0] == tok.backend.token_to_id("<bos>") and ids[0, n - 1] == tok.eos_id
    assert (ids[0, n:] == tok.pad_id).all() and (mask[0, n:] == 0).all()
    assert tok.decode(ids[0]) == "a small red circle"
    assert tok.decode(ids[1]) == "a big blue square"  # lower-cased by the normaliser
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert torch.equal(again(CORPUS[:3], 16)[0], tok(CORPUS[:3], 16)[0])


def test_truncation_keeps_end_of_text():
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    ids, mask = tok("a big blue square left of a green triangle " * 5, context_length=8)
    assert mask.sum() == 8 and ids[0, -1] == tok.eos_id


def test_unknown_words_still_encode():
    tok = Tokenizer.train(CORPUS, vocab_size=300)
    ids, mask = tok("crimson ball", 16)  # byte-level: never an unknown token
    assert tok.decode(ids[0]) == "crimson ball"
