"""Learning-rate schedules as pure functions of the (0-based) epoch: what `train.lr_schedule` names.

The rate of epoch e is train.lr x factor(e); training applies the factor through torch's LambdaLR, stepped at
every epoch end (trainer.build_optimizer, train.VAEModule.on_train_epoch_end), so a resumed training restores
the schedule's position from its checkpoint.

Imports: the standard library only (no torch), so that `presets` (an edge module without torch) can
use the same schedule as training.
"""

from __future__ import annotations

from collections.abc import Callable

LR_SCHEDULES = ("constant", "iwae")  # the values of train.lr_schedule

# IWAE (Burda et al. 2016, arXiv:1509.00519v4, Section 5.1): 10^(-i/7) times the base rate (0.001 in the
# paper) for 3^i passes over the data, i = 0..7: 1 + 3 + ... + 2,187 = 3,280 epochs in all.
IWAE_STAGES = 8  # i = 0 .. 7
IWAE_TOTAL_EPOCHS = sum(3**i for i in range(IWAE_STAGES))  # 3,280 epochs


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")


def iwae_stage(epoch: int) -> int:
    """IWAE's stage i at (0-based) `epoch`: stage i covers epochs [(3^i - 1)/2, (3^(i+1) - 1)/2), so epoch
    0 is stage 0 (1 epoch), epochs 1-3 stage 1, 4-12 stage 2, ...; from epoch 3,280 on, the last stage (7)."""
    _check_epoch(epoch)
    stage = 0
    while stage < IWAE_STAGES - 1 and epoch >= (3 ** (stage + 1) - 1) // 2:
        stage += 1
    return stage


def iwae_factor(epoch: int) -> float:
    """The factor 10^(-i/7) on the base learning rate at (0-based) `epoch`, i = iwae_stage(epoch); after
    the schedule's 3,280 epochs it stays at the last stage's 10^(-1)."""
    return 10 ** (-iwae_stage(epoch) / 7)


def iwae_lr(epoch: int, base_lr: float = 1e-3) -> float:
    """IWAE's learning rate at (0-based) `epoch`: base_lr x 10^(-i/7) for 3^i epochs, i = 0..7 (the paper's
    base_lr is 0.001). The authors' code rounds the factor to one decimal (1e-4 x round(10^(1 - i/7), 1));
    this follows the paper."""
    return base_lr * iwae_factor(epoch)


def lr_factor(name: str) -> Callable[[int], float] | None:
    """The factor on train.lr as a function of the (0-based) epoch for the schedule `name` (LambdaLR's
    lr_lambda); None for "constant" (no scheduler at all: the optimiser alone, as before the key existed)."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; allowed: {', '.join(LR_SCHEDULES)}")
    return None if name == "constant" else iwae_factor
