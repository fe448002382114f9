"""Make the README picture of the browser review app (``review-app.png``) with a real run.

    python Resources/Screenshots/make_review_screenshot.py [--shared ../shared] [--out Resources/Screenshots]

It starts ``universalseg review`` on a temporary folder holding the shared small example CT
(TotalSegmentator's ``example_ct_sm``, 122x101x30 voxels at 3 mm), opens the page in Debian's chromium
(Playwright, as the browser tests do), runs the packaged demo model (phantom-trained) on liver, spleen and
both kidneys on the CPU, accepts the liver and takes a 1600x950 screenshot. The segments are that model's
real prediction on a real CT: rough, because the demo model has only seen phantoms.
Needs the ``web`` extra, Playwright and chromium.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "UniversalSeg")]

#: (search text, class key) ticked in the page.
CLASSES = (("liver", "liver"), ("spleen", "spleen"), ("kidney", "right_kidney"), ("kidney", "left_kidney"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "Screenshots")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from browser import launch_chromium, review_command, web_server

    ct = args.shared / "data" / "totalsegmentator" / "example_ct_sm.nii.gz"
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(ct, Path(folder) / ct.name)
        env = {"UNIVERSALSEG_RUNTIME": "torch",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "UniversalSeg"), os.environ.get("PYTHONPATH")]))}
        with web_server(review_command(folder, "--device", "cpu"), env=env) as server, sync_playwright() as play:
            browser = launch_chromium(play)
            page = browser.new_page(viewport={"width": 1600, "height": 950})
            page.goto(server.address)
            page.get_by_test_id(f"entry-{ct.name}").click(timeout=120_000)
            page.wait_for_function("document.querySelector('[data-testid=message]').innerText.includes('Opened')")
            for search, key in CLASSES:
                page.get_by_test_id("class-search").locator("input").fill(search)
                page.get_by_test_id(f"class-{key}").locator("input").check()
            page.get_by_test_id("progressive").locator("input").uncheck()
            page.get_by_test_id("run").click()
            page.get_by_test_id("segment-Liver").wait_for(timeout=300_000)
            page.get_by_test_id("segment-Liver").get_by_test_id("accept").click()
            page.wait_for_selector('[data-testid="segment-Liver"][data-state="accepted"]')
            page.wait_for_timeout(2000)  # the views' next images
            args.out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out / "review-app.png"))
            print(f"{args.out / 'review-app.png'}: {page.get_by_test_id('stage').inner_text()}")
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
