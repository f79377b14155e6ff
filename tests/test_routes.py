import torch

from megatron_trace.routes import Route, routes_from_spans


def test_key_spans_of_correct_responses_route_to_fkl():
    m = torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    assert routes_from_spans(m, True).tolist() == [0, 1, 1, 0]
    assert routes_from_spans(m, True, fkl=False).tolist() == [0, 0, 0, 0]


def test_error_spans_of_incorrect_responses_route_to_rkl_only_when_enabled():
    m = torch.tensor([1, 0, 1], dtype=torch.bool)
    assert routes_from_spans(m, False).tolist() == [0, 0, 0]
    assert routes_from_spans(m, False, rkl=True).tolist() == [Route.RKL, 0, Route.RKL]
