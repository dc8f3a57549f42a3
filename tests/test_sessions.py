"""Stop rules of a round's commit: the same as the target alone."""

import math

from edge_controller.sessions import RequestStats, commit

EOS = {2}


def test_full_acceptance_commits_drafts_and_bonus():
    assert commit([5, 6, 7], 3, 9, generated=0, max_new_tokens=10, eos_token_ids=EOS) == (
        [5, 6, 7, 9], False)


def test_rejection_commits_prefix_and_correction():
    assert commit([5, 6, 7], 1, 8, generated=0, max_new_tokens=10, eos_token_ids=EOS) == (
        [5, 8], False)


def test_end_of_sequence_inside_accepted_drafts_stops_there():
    assert commit([5, 2, 7], 3, 9, generated=0, max_new_tokens=10, eos_token_ids=EOS) == (
        [5, 2], True)


def test_end_of_sequence_as_correction_is_kept_and_stops():
    assert commit([5, 6], 0, 2, generated=0, max_new_tokens=10, eos_token_ids=EOS) == ([2], True)


def test_max_new_tokens_cuts_the_round():
    assert commit([5, 6, 7], 3, 9, generated=8, max_new_tokens=10, eos_token_ids=EOS) == (
        [5, 6], True)


def test_empty_draft_is_a_plain_decode_step():
    assert commit([], 0, 4, generated=3, max_new_tokens=10, eos_token_ids=EOS) == ([4], False)


def test_acceptance_estimate_is_censored():
    stats = RequestStats(drafted=8, accepted=6, rejections=1)  # e.g. rounds 4/4 and 2/4
    assert stats.acceptance_estimate == 6 / 7
    assert math.isnan(RequestStats().acceptance_estimate)
