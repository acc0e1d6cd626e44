"""mg-reproduce's optional ep_cluster stage: off by default, and its table reaches the report."""

from __future__ import annotations

from megatron_grouter.reproduce import ep_cluster_stage


def _compose_reproduce(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from megatron_grouter.app import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR / "reproduce"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_stage_is_off_by_default_and_can_be_switched_on():
    assert _compose_reproduce([]).ep_cluster.enabled is False
    switched = _compose_reproduce(["ep_cluster.enabled=true", "ep_cluster.rate_mbit=50"])
    assert switched.ep_cluster.enabled is True and switched.ep_cluster.rate_mbit == 50


def test_report_lines_show_the_table_or_why_the_stage_was_skipped():
    table = ["| layout | step ms |", "|---|---:|", "| default + megatron alltoall | 900 |"]
    shown = ep_cluster_stage.report_lines({"ep_cluster": {"table": table}})
    assert shown[-3:] == table and "emulated nodes" in shown[1]
    assert ep_cluster_stage.report_lines({"ep_cluster": {"skipped": "network namespaces need root"}}) == [
        "", "EP over 2 emulated nodes: skipped (network namespaces need root)."]
    assert ep_cluster_stage.report_lines({"ep_cluster": {"skipped": "ep_cluster.enabled=false"}}) == []
    assert ep_cluster_stage.report_lines({}) == []

