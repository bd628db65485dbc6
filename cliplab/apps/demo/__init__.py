"""``cliplab demo``: the main job end to end on the shipped model, with an HTML report.

    from cliplab.apps.demo import run_demo
    result = run_demo(out_dir="cliplab-demo")      # result.report -> cliplab-demo/report.html
"""

from .job import TEXT_QUERIES, DemoResult, run_demo
from .report import png_data_uri, write_report

__all__ = ["run_demo", "DemoResult", "TEXT_QUERIES", "write_report", "png_data_uri"]
