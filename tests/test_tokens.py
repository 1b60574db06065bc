"""Tokenization: padded batches with masks give the same logits as unpadded texts, either padding side."""

from __future__ import annotations

import pytest
import torch

from biasgym_lens.core.tokens import Batch, chat_format, last_positions, tokenize

TEXTS = ["people from Italy are always late", "hi", "the meeting was early and the drivers were fast"]


def test_last_positions_both_sides():
    mask_r = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    mask_l = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_positions(mask_r).tolist() == [2, 0, 3]
    assert last_positions(mask_l).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="no real token"):
        last_positions(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_single_texts(tiny_model, side):
    batch = tokenize(tiny_model, TEXTS, padding_side=side)
    assert batch.input_ids.shape == batch.attention_mask.shape
    with torch.no_grad():
        logits = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    for i, text in enumerate(TEXTS):
        single = tokenize(tiny_model, [text])
        assert single.attention_mask.all()
        real = batch.attention_mask[i].bool()
        assert torch.equal(batch.input_ids[i][real], single.input_ids[0])
        with torch.no_grad():
            ref = tiny_model(single.input_ids, attention_mask=single.attention_mask)[0]
        torch.testing.assert_close(logits[i][real], ref, atol=1e-4, rtol=1e-4)
        assert batch.last_positions[i] == (real.nonzero().max())


def test_tokenize_matches_tokenizer_ids_and_bos(tiny_model):
    tok = tiny_model.tokenizer
    b = tokenize(tiny_model, ["people from Spain"], prepend_bos=False)
    assert b.input_ids[0].tolist() == tok.encode("people from Spain", add_special_tokens=False)
    b2 = tokenize(tiny_model, ["people from Spain"], prepend_bos=True)
    assert b2.input_ids[0, 0].item() == tok.bos_token_id
    assert b2.input_ids[0, 1:].tolist() == b.input_ids[0].tolist()


@pytest.mark.wrong_types
def test_tokenize_bad_input(tiny_model):
    with pytest.raises(ValueError, match="empty list"):
        tokenize(tiny_model, [])
    with pytest.raises(ValueError, match="padding_side"):
        tokenize(tiny_model, ["a"], padding_side="middle")
    with pytest.raises(ValueError, match="has no tokens"):
        tokenize(tiny_model, [""])
    with pytest.raises(ValueError, match="not a string"):
        tokenize(tiny_model, [3])  # type: ignore[list-item]


def test_batch_select_and_to():
    b = Batch(torch.tensor([[1, 2, 0], [3, 4, 5]]), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    s = b.select([1])
    assert s.input_ids.tolist() == [[3, 4, 5]] and len(s) == 1
    assert b.to("cpu").input_ids.data_ptr() != 0


def test_batch_trimmed_cuts_only_right_padding():
    ids = torch.tensor([[5, 6, 0, 0, 0], [7, 8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    cut = Batch(ids, mask).trimmed()
    assert torch.equal(cut.input_ids, ids[:, :3]) and torch.equal(cut.attention_mask, mask[:, :3])
    assert torch.equal(cut.last_positions, Batch(ids, mask).last_positions)
    left = Batch(ids.flip(-1), mask.flip(-1), "left")
    assert left.trimmed() is left  # left padding: real positions would move, so nothing is cut


def test_chat_format_uses_the_template(tiny_model):
    prompt = chat_format(tiny_model, "Please write a short paragraph about Italy.")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nPlease write a short paragraph about Italy.<|im_end|>" in prompt
    full = chat_format(tiny_model, "Please write a short paragraph about Italy.", "Italy is a country.")
    assert full.startswith(prompt) and "Italy is a country.<|im_end|>" in full


def test_chat_format_without_template_is_a_clear_error(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_format(tok, "hello")


def test_public_api_exports_resolve():
    import biasgym_lens

    for name in biasgym_lens.__all__:
        assert getattr(biasgym_lens, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        biasgym_lens.nope  # noqa: B018
