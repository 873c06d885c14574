"""Each rank draws its own dropout/drop-path masks (#28 item 7), from identical initial weights."""

import torch

import models
from trainer.run import seed_everything, seed_rank_streams


def _rank_model_and_masks(seed, rank):
    seed_everything(seed)  # build: the same weights on every rank
    net = models.create("vit_t", embedding_size=8, depth=1, drop_path_rate=0.5).train()
    seed_rank_streams(seed, rank)
    x = torch.ones(4, 3, 112, 112)
    weights = {k: v.clone() for k, v in net.state_dict().items()}  # before BN stats move
    return weights, net(x)


def test_ranks_share_the_initial_weights_but_not_the_masks():
    w0, out0 = _rank_model_and_masks(5, 0)
    w1, out1 = _rank_model_and_masks(5, 1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not torch.equal(out0, out1)  # drop-path drew other samples on rank 1
    _, again = _rank_model_and_masks(5, 1)
    assert torch.equal(out1, again)  # and the same ones again for the same rank and seed
