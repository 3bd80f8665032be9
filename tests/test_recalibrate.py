"""BatchNorm re-estimation after training: exact statistics, masks off, modes restored."""

from __future__ import annotations

import torch
from torch import nn

from autodropout import Dropout, SpatialDropout
from workers.recalibrate import recalibrate_batchnorm


def test_statistics_are_those_of_the_maskless_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), SpatialDropout(0.5), nn.BatchNorm2d(4),
                          Dropout(0.5), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    batches = [torch.randn(16, 1, 8, 8) for _ in range(5)]
    model.train()
    assert recalibrate_batchnorm(model, batches) == 2
    assert model.training and all(m.training for m in model.modules())
    assert model[2].momentum == 0.1 and model[5].momentum == 0.1
    with torch.no_grad():  # the statistics the eval-mode model meets: no dropout anywhere
        first = model[0](torch.cat(batches))
        second = model[4](model[2].eval()(first))
    torch.testing.assert_close(model[2].running_mean, first.mean((0, 2, 3)))
    assert model[5].num_batches_tracked == 5
    torch.testing.assert_close(model[5].running_mean, second.mean((0, 2, 3)), rtol=1e-5,
                               atol=1e-5)
    # cumulative averages of per-batch unbiased variances, as torch.optim.swa_utils.update_bn
    variances = torch.stack([model[0](b).var((0, 2, 3), unbiased=True) for b in batches])
    torch.testing.assert_close(model[2].running_var, variances.mean(0).detach())


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 2), Dropout(0.2)).eval()
    assert recalibrate_batchnorm(model, [torch.randn(4, 3)]) == 0
    assert not model.training
