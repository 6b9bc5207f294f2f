"""Transitional, for tests/test_demo.py only: the browser helpers now live in conftest.py
(fixture `report_browser`; `ReportPage` has them as methods). Delete this file once test_demo
uses the fixture."""

from conftest import (  # noqa: F401
    ReportPage,
    highlighted,
    hover_point,
    images_not_loaded,
    map_points,
    open_report,
)
