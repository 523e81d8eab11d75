import re
from pathlib import Path

import pytest

from peftlab.repro import cpuinfo_field, hardware


def test_the_cpu_family_and_model_are_read_whole_and_recorded():
    """Records name the CPU's family and model (virtual machines often name only "AMD EPYC"); the field "model"
    must not be taken from a "model name" line, which a prefix match of "model" also matches."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo here (not Linux)")
    text = cpuinfo.read_text()
    model = re.search(r"^model\s*:\s*(.*)$", text, re.M)
    family = re.search(r"^cpu family\s*:\s*(.*)$", text, re.M)
    name = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    if not (model and family):
        pytest.skip("this CPU's /proc/cpuinfo has no family/model lines")
    assert cpuinfo_field("model") == model.group(1).strip()
    if name:
        assert cpuinfo_field("model name") == name.group(1).strip()
    assert hardware()["cpu_family_model"] == f"{family.group(1).strip()}/{model.group(1).strip()}"
