import logging

from qpdeploy.quiet import quiet_third_party


def test_known_notices_are_dropped_and_real_warnings_kept(caplog):
    quiet_third_party()
    quiet_third_party()  # idempotent
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back")
        logging.getLogger("diffusers.pipelines.pipeline_utils").warning(
            "Cannot initialize model with low cpu memory usage because `accelerate` was not found in the environment")
        logging.getLogger("transformers.utils.import_utils").warning("something real went wrong")
        logging.getLogger("diffusers.models.modeling_utils").warning("a weight was not loaded")
    assert [r.getMessage() for r in caplog.records] == ["something real went wrong", "a weight was not loaded"]
