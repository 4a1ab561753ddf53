"""The 2026-07-17 record's schedule (job/speedrun_2026_07_17/schedule.py) at chosen steps, against values worked out
by hand from the record's stage table: 1380 scheduled steps in thirds, 10 of extension, a cooldown over the last 60%
of the scheduled steps to 0.15, Muon's momentum 0.85 -> 0.95 over 300 steps and back over the last 50."""

from __future__ import annotations

import pytest

from job.speedrun_2026_07_17.schedule import TrainingSchedule

S = TrainingSchedule()
CD_START, CD_LEN = 552, 1380 - 552  # int(1380 * 0.4), the cooldown's first step and its length


def test_the_stages_are_thirds_of_the_scheduled_steps_then_the_extension():
    assert S.boundaries == [(0, 460), (460, 920), (920, 1380), (1380, 1390)]
    assert S.total_steps == 1390 and S.transition_steps() == [460, 920, 1380]
    assert [S.at(step).stage for step in (0, 459, 460, 919, 920, 1379, 1380, 1389, 1390)] == [0, 0, 1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize(
    ("step", "batch", "seq_len", "windows"),
    [
        (0, 8 * 16384, 896, (1, 3)),
        (459, 8 * 16384, 896, (1, 3)),
        (460, 8 * 32768, 2048, (3, 7)),
        (919, 8 * 32768, 2048, (3, 7)),
        (920, 8 * 49152, 2048, (5, 11)),
        (1379, 8 * 49152, 2048, (5, 11)),
        (1380, 8 * 49152, 2048, (6, 13)),
        (1389, 8 * 49152, 2048, (6, 13)),
        (1390, 8 * 49152, 2048, (6, 20)),  # the final validation's longer window
    ],
)
def test_batch_sequence_length_and_windows(step, batch, seq_len, windows):
    s = S.at(step)
    assert (s.batch_tokens, s.seq_len, s.windows) == (batch, seq_len, windows)
    assert s.window_tokens == (windows[0] * 128, windows[1] * 128)


@pytest.mark.parametrize(
    ("step", "lr"),
    [
        (0, 1.0),
        (459, 1.0),
        (460, 1.52),
        (551, 1.52),  # constant until the cooldown...
        (552, 1.52),
        (700, 1.52 * (1 - 148 / CD_LEN) + 0.15 * 148 / CD_LEN),  # ...which starts from the stage's rate...
        (920, 1.73 * (1 - 368 / CD_LEN) + 0.15 * 368 / CD_LEN),  # ...and the next stage's, where it changes
        (1379, 1.73 * (1 - 827 / CD_LEN) + 0.15 * 827 / CD_LEN),
        (1380, 0.15),
        (1389, 0.15),
    ],
)
def test_learning_rate(step, lr):
    assert S.at(step).lr == pytest.approx(lr, rel=1e-12)


@pytest.mark.parametrize(
    ("step", "weights"),
    [
        (0, (1.0, 0.5, 0.25)),
        (230, (1.0, 0.5, 0.125)),
        (459, (1.0, 0.5, 0.25 * (1 - 459 / 460))),
        (460, (1.0, 0.5)),
        (690, (1.0, 0.25)),
        (919, (1.0, 0.5 / 460)),
        (920, (1.0,)),
        (1380, (1.0,)),
        (1390, (1.0,)),
    ],
)
def test_multi_token_prediction_weights(step, weights):
    assert S.at(step).mtp_weights == pytest.approx(weights, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("step", "momentum"),
    [
        (0, 0.85),
        (150, 0.90),
        (299, 0.85 + 0.1 * 299 / 300),
        (300, 0.95),
        (1340, 0.95),
        (1365, 0.90),
        (1390, 0.85),
    ],
)
def test_muon_momentum_warms_up_and_cools_down(step, momentum):
    assert S.at(step).muon_momentum == pytest.approx(momentum, rel=1e-12)


def test_adam_steps_the_untying_and_the_fp8_bootstrap():
    assert [S.at(step).adam for step in range(4)] == [False, True, False, True]
    assert S.untie_step == 921  # the third stage's first step, made odd so that Adam updates at it
    assert [(S.at(step).untie, S.at(step).tied) for step in (920, 921, 922)] == [(False, True), (True, True), (False, False)]
    assert S.at(16).fp8_bootstrap and not S.at(17).fp8_bootstrap  # the record's quantisation after step 15 bootstraps


def test_the_long_window_changes_where_the_stages_change_it():
    changes = {step: S.at(step).long_window_change for step in range(S.total_steps + 1) if S.at(step).long_window_change}
    # (old, new) in tokens: the rotary tables are rescaled for the training window, not the final validation's.
    assert changes == {460: (3 * 128, 7 * 128), 920: (7 * 128, 11 * 128), 1380: (11 * 128, 13 * 128)}


def test_a_shorter_schedule_keeps_the_shape():
    short = TrainingSchedule(scheduled_steps=24, extension_steps=4)
    assert short.boundaries == [(0, 8), (8, 16), (16, 24), (24, 28)] and short.untie_step == 17
    assert short.at(9).lr == pytest.approx(1.52) and short.at(24).lr == pytest.approx(0.15)


def test_durations_that_do_not_add_up_are_refused():
    from dataclasses import replace

    from job.speedrun_2026_07_17.schedule import STAGES

    with pytest.raises(ValueError, match="add up"):
        TrainingSchedule(stages=(replace(STAGES[0], duration=0.5), *STAGES[1:]))
