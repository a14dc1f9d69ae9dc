"""Walks the monitor's pages in headless Chromium, as an engineer would, and saves a screenshot
of each: the dashboard, the task list and a search, a failed task's page, its retry through the
form (until the new task shows SUCCESS), the workers, the queues and the audit log.

    walk.py <monitor base URL> <screenshot dir> <failed task id> <worker node name>

Prints one line per step; exits non-zero (with the page's text) at the first step that fails.
Chromium and chromedriver are the Debian packages (CHROMIUM / CHROMEDRIVER override the paths).
"""

import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

base, out, failed_id, node = sys.argv[1:5]
os.makedirs(out, exist_ok=True)

options = webdriver.ChromeOptions()
options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1280,1000", "--lang=en-US"):
    options.add_argument(arg)
driver = webdriver.Chrome(
    service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")), options=options)
# Generous waits: the suite runs this next to everything else on two cores.
driver.set_page_load_timeout(60)
# A form's submit navigates while a condition may still read the old page's body: that read
# raises StaleElementReferenceException, which means "not yet", not "failed".
wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))


def fail(step, why):
    body = driver.find_element(By.TAG_NAME, "body").text[:3000]
    print(f"FAILED {step}: {why}\n--- page ---\n{body}", file=sys.stderr)
    driver.save_screenshot(os.path.join(out, f"failed-{step}.png"))
    driver.quit()
    sys.exit(1)


def shot(name):
    driver.save_screenshot(os.path.join(out, f"{name}.png"))
    print(f"ok {name}: {driver.title}")


def text():
    return driver.find_element(By.TAG_NAME, "body").text


def open_page(step, path, must_contain):
    driver.get(base + path)
    try:
        wait.until(lambda d: must_contain in text())
    except Exception:
        fail(step, f"{must_contain!r} not on {path}")


open_page("dashboard", "/?refresh=0", "Queues")
shot("01-dashboard")

# Other tests share the event stream: filter by name so this run's task is on the first page.
open_page("tasks", "/tasks?refresh=0&taskname=test.until_fixed", "test.until_fixed")
shot("02-tasks")

# Search as an engineer types it: failed tasks of this name.
box = driver.find_element(By.NAME, "search")
box.clear()
box.send_keys("state:FAILURE name:test.until_fixed")
box.submit()
try:
    wait.until(lambda d: failed_id in text() or "state%3AFAILURE" in d.current_url
               or "state:FAILURE" in d.current_url)
    wait.until(lambda d: failed_id in text())
except Exception:
    fail("search", f"the failed task {failed_id} is not in the search results")
if "SUCCESS" in [e.text for e in driver.find_elements(By.CSS_SELECTOR, "td.SUCCESS")]:
    fail("search", "a SUCCESS row in a state:FAILURE search")
shot("03-tasks-search")

driver.find_element(By.PARTIAL_LINK_TEXT, failed_id[:8]).click()
try:
    wait.until(lambda d: "Retry under a new id" in text() and "ConnectionError" in text())
except Exception:
    fail("task", "the failed task's page has no retry form or exception")
shot("04-task-failed")

# Retry through the form: a reason from the list and a note.
Select(driver.find_element(By.NAME, "reason")).select_by_visible_text("the cause was fixed")
driver.find_element(By.NAME, "note").send_keys("ledger back (browser test)")
driver.find_element(By.XPATH, "//button[text()='Retry under a new id']").click()
try:
    wait.until(lambda d: "Sent as a retry of" in text())
except Exception:
    fail("retry", "no page for the retried task")
retried_url = driver.current_url
deadline = time.time() + 60
while "SUCCESS" not in driver.find_element(By.TAG_NAME, "h1").text:
    if time.time() > deadline:
        fail("retry", "the retried task did not succeed")
    time.sleep(0.25)
    driver.get(retried_url)
shot("05-task-retried")

open_page("workers", "/workers?refresh=0", node)
shot("06-workers")

open_page("queues", "/queues?refresh=0", "queue")
shot("07-queues")

open_page("audit", "/audit", "ledger back (browser test)")
if "task.retry" not in text():
    fail("audit", "the retry is not in the audit log")
shot("08-audit")

print(f"retried {failed_id} as {retried_url.split('/task/')[1].split('?')[0]}")
driver.quit()
