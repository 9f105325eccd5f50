"""Learning-rate schedules: IWAE's stages as pure functions, and the rates a real optimiser gets from them
through the scheduler training uses (trainer.build_optimizer), epoch by epoch."""

from __future__ import annotations

import pytest
import torch

from vaerepro import schedules
from vaerepro.config import TrainConfig
from vaerepro.schedules import IWAE_STAGES, IWAE_TOTAL_EPOCHS, iwae_factor, iwae_lr, iwae_stage, lr_factor

# IWAE 5.1: stage i (i = 0..7) starts at epoch 1 + 3 + ... + 3^(i-1) = (3^i - 1) / 2 and lasts 3^i epochs
STARTS = [0, 1, 4, 13, 40, 121, 364, 1093]


def test_stages_are_the_papers_3_to_the_i_epochs_and_3280_in_all():
    assert IWAE_STAGES == 8 and IWAE_TOTAL_EPOCHS == 3280
    assert [(3**i - 1) // 2 for i in range(IWAE_STAGES)] == STARTS
    stages = [iwae_stage(e) for e in range(IWAE_TOTAL_EPOCHS)]
    assert [stages.count(i) for i in range(IWAE_STAGES)] == [3**i for i in range(IWAE_STAGES)]
    assert stages == sorted(stages)  # one block per stage, in order
    for i, start in enumerate(STARTS):
        assert iwae_stage(start) == i and (start == 0 or iwae_stage(start - 1) == i - 1)
    # after the schedule: the last stage's rate, for as long as training runs
    assert iwae_stage(IWAE_TOTAL_EPOCHS) == iwae_stage(10**6) == 7


def test_iwae_rates_known_answers():
    assert iwae_lr(0) == 1e-3  # the paper's base rate by default
    assert iwae_lr(1) == 1e-3 * 10 ** (-1 / 7) == pytest.approx(7.196856730011521e-4, rel=1e-15)
    assert iwae_lr(3) == iwae_lr(1) and iwae_lr(4) == pytest.approx(5.179474679231212e-4, rel=1e-15)
    assert iwae_lr(1092) == pytest.approx(1e-3 * 10 ** (-6 / 7), rel=1e-15)
    assert iwae_lr(1093) == iwae_lr(3279) == iwae_lr(3280) == pytest.approx(1e-4, rel=1e-15)
    # another base rate scales every epoch's rate, the factor is the schedule's
    assert all(iwae_lr(e, 0.02) == 0.02 * iwae_factor(e) for e in range(0, 3300, 7))
    assert sum(iwae_lr(e) != iwae_lr(e + 1) for e in range(IWAE_TOTAL_EPOCHS + 10)) == 7  # 7 drops


@pytest.mark.parametrize("bad", [-1, 1.0, True, "3", None])
def test_a_bad_epoch_is_refused(bad):
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        iwae_lr(bad)


def test_lr_factor_names_the_schedules():
    assert lr_factor("constant") is None  # no scheduler at all
    assert lr_factor("iwae") is iwae_factor
    assert schedules.LR_SCHEDULES == ("constant", "iwae")
    with pytest.raises(ValueError, match="allowed: constant, iwae"):
        lr_factor("cosine")


def _optimiser(**train):
    from vaerepro.trainer import build_optimizer

    param = torch.nn.Parameter(torch.zeros(3))
    return build_optimizer([param], TrainConfig(**train).model_dump())


def test_a_real_optimiser_follows_the_iwae_schedule_over_its_3280_epochs():
    """Through LambdaLR as training builds it, stepped once an epoch: param_groups' lr at epoch e is the
    schedule's, exactly, at every epoch and at every stage boundary; after 3,280 epochs the last rate."""
    built = _optimiser(lr=1e-3, lr_schedule="iwae")
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert (
        isinstance(sched, torch.optim.lr_scheduler.LambdaLR) and built["lr_scheduler"]["interval"] == "epoch"
    )
    lrs = []
    for _ in range(IWAE_TOTAL_EPOCHS + 5):
        lrs.append(opt.param_groups[0]["lr"])  # the rate this epoch's steps use
        opt.step()  # no gradients: changes nothing, but torch expects a step before the scheduler's
        sched.step()  # the epoch's end
    assert lrs == [iwae_lr(e) for e in range(IWAE_TOTAL_EPOCHS + 5)]
    for i, start in enumerate(STARTS):
        assert lrs[start] == 1e-3 * 10 ** (-i / 7), i
        if i:
            assert lrs[start - 1] == 1e-3 * 10 ** (-(i - 1) / 7), i
    assert lrs[IWAE_TOTAL_EPOCHS - 1] == lrs[-1] == pytest.approx(1e-4, rel=1e-15)


def test_a_constant_rate_has_no_scheduler():
    opt = _optimiser(lr=0.02)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.02
