"""Token embeddings: word dropout drops whole positions in training and nothing in evaluation."""

from __future__ import annotations

import torch

from nmt.embedding import TokenEmbedding


def test_word_dropout_zeroes_whole_positions_scales_the_rest_and_is_off_in_eval():
    torch.manual_seed(0)
    embed = TokenEmbedding(50, 16, pad_id=0, dropout=0.0, word_dropout=0.3)
    tokens = torch.randint(1, 50, (40, 25))
    plain = torch.nn.functional.embedding(tokens, embed.weight)
    with torch.no_grad():
        dropped = embed(tokens)
    zero = (dropped == 0).all(-1)  # [40, 25]: whole positions
    assert 0.2 < zero.float().mean() < 0.4
    assert torch.allclose(dropped[~zero], plain[~zero] / 0.7)
    assert ((dropped == 0) == zero.unsqueeze(-1)).all()  # no position is partly dropped
    embed.eval()
    assert torch.equal(embed(tokens), plain)
