"""The options several subcommands share."""

from gnsp_core.data.mtil import MTIL_ORDER_II
from service.cli.arguments import task_sources


def test_task_lists_expand_mtil_orders():
    assert task_sources(" digits, ./my.zip ,") == ["digits", "./my.zip"]
    expanded = task_sources("mtil:order-II@/data,mnist")
    assert expanded == [f"mtil:{name}@/data" for name in MTIL_ORDER_II] + ["mnist"]
    assert task_sources("mtil:cars@/data") == ["mtil:cars@/data"]
