"""The annotate config section: YAML-shaped dicts load with field-named errors and build the right annotator."""

import pytest

from megatron_trace.annotate.client import OpenAIAnnotator
from megatron_trace.annotate.config import AnnotateConfig, build_annotator
from megatron_trace.annotate.self_annotator import SelfAnnotator
from megatron_trace.config_base import ConfigError, from_dict


def test_external_annotator_section_builds_the_http_client():
    cfg = from_dict(AnnotateConfig, {"annotator": "external", "client": {"base_url": "http://127.0.0.1:9/v1",
                                     "model": "judge"}, "spans": {"coverage_cap": 0.3, "rkl": True}})
    assert cfg.spans.coverage_cap == 0.3 and cfg.spans.rkl and cfg.spans.fkl
    annotator = build_annotator(cfg)
    assert isinstance(annotator, OpenAIAnnotator) and annotator.url == "http://127.0.0.1:9/v1/chat/completions"
    annotator.close()


def test_self_annotator_needs_the_engine():
    cfg = from_dict(AnnotateConfig, {"annotator": "self"})
    with pytest.raises(ValueError, match="needs the generation engine"):
        build_annotator(cfg)
    assert isinstance(build_annotator(cfg, engine=object(), tokenizer=object()), SelfAnnotator)


@pytest.mark.parametrize("data,msg", [
    ({"annotator": "external"}, "client.model: required when annotator is 'external'"),
    ({"spans": {"mode": "everything"}}, "spans.mode"),
    ({"spans": {"coverage_cap": 2.0}}, "spans.coverage_cap: must be in"),
    ({"annotator": "external", "client": {"base_url": "http://x/v1"}}, "client.model"),
    ({"max_spans": 0}, "max_spans"),
])
def test_bad_sections_name_the_field(data, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict(AnnotateConfig, data)
