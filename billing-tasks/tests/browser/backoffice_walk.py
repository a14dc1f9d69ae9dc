"""Walks the billing back-office in headless Chromium as two members of staff would, in its
default Russian, and saves a screenshot of each step: support (sveta) signs in, finds the payers
by the card's last four digits, opens one and asks for a full refund of a payment (above the
approval threshold, so it waits), signs out; an accountant (anna) signs in, approves it, sees
the refund succeed on the payer's page, and checks the succeeded payments list against its CSV
export; last, the payer's page in English.

    backoffice_walk.py <base URL> <screenshot dir> <payer id> <payment id>

Prints one `ok <step>` line per step; exits non-zero (with the page's text) at the first step
that fails. Chromium and chromedriver are the Debian packages (CHROMIUM / CHROMEDRIVER override
the paths).
"""

import csv
import io
import os
import re
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

base, out, payer_id, payment_id = sys.argv[1:5]
PASSWORD = os.environ.get("BO_PASSWORD", "correct horse battery staple")
os.makedirs(out, exist_ok=True)

options = webdriver.ChromeOptions()
options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--window-size=1400,1100", "--lang=ru-RU"):
    options.add_argument(arg)
driver = webdriver.Chrome(
    service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")), options=options)
# Generous waits: the suite runs this next to everything else on two cores.
driver.set_page_load_timeout(60)
driver.set_script_timeout(60)
# A form's submit navigates while a condition may still read the old page: that read raises
# StaleElementReferenceException, which means "not yet", not "failed".
wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))

step = "start"


def text():
    return driver.find_element(By.TAG_NAME, "body").text


def fail(why):
    try:
        body = text()[:3000]
    except Exception as e:  # the page itself may be what broke
        body = f"(no page text: {e})"
    print(f"FAILED {step}: {why}\n--- {driver.current_url} ---\n{body}", file=sys.stderr)
    try:
        driver.save_screenshot(os.path.join(out, f"failed-{step}.png"))
    finally:
        driver.quit()
    sys.exit(1)


def shot(name, what=""):
    driver.save_screenshot(os.path.join(out, f"{name}.png"))
    print(f"ok {name}: {driver.title}" + (f" ({what})" if what else ""))


def until(condition, why):
    try:
        return wait.until(lambda d: condition())
    except Exception:
        fail(why)


def one(css, within=None):
    found = (within or driver).find_elements(By.CSS_SELECTOR, css)
    if len(found) != 1:
        fail(f"{len(found)} elements match {css!r}, expected one")
    return found[0]


def roubles(shown):
    """'1 234,56 ₽' (Russian page) or '1,234.56 ₽' (English) as '1234.56', like the CSV."""
    digits = re.sub(r"[^0-9,.\-]", "", shown)
    if "," in digits and "." not in digits:
        digits = digits.replace(",", ".")
    else:
        digits = digits.replace(",", "")
    return digits


def into_view(element):
    """Scrolls so that the screenshot shows `element` mid-window."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)


def submit(form):
    """Presses the form's own button, as a person would."""
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def sign_in(user, screenshot=None):
    driver.get(base + "/admin/login")
    form = until(lambda: driver.find_element(By.ID, "login"), "no sign-in form")
    form.find_element(By.NAME, "user").clear()
    form.find_element(By.NAME, "user").send_keys(user)
    form.find_element(By.NAME, "password").send_keys(PASSWORD)
    if screenshot:
        shot(screenshot, f"{user} at the sign-in form")
    submit(form)
    until(lambda: driver.find_elements(By.ID, "signout") and user in
          driver.find_element(By.CSS_SELECTOR, "header .me").text,
          f"{user} is not signed in")


def run():
    global step
    payer_page = f"{base}/admin/payers/{payer_id}"

    step = "login"
    sign_in("sveta", "01-login")

    step = "home"
    until(lambda: driver.find_elements(By.ID, "search"), "no search box on the home page")
    if not driver.current_url.rstrip("/").endswith("/admin"):
        fail(f"signed in to {driver.current_url}, not the home page")
    if "sveta · support" not in driver.find_element(By.CSS_SELECTOR, "header .me").text:
        fail("the header does not say who is signed in")
    shot("02-home", "signed in as sveta")

    step = "search"
    box = driver.find_element(By.ID, "search")
    box.send_keys("3055")
    box.submit()
    until(lambda: "/admin/search" in driver.current_url and driver.find_elements(By.ID, "payers"),
          "no payers table after searching for 3055")
    rows = driver.find_elements(By.CSS_SELECTOR, "#payers tr:has(td)")
    listed = [r.find_element(By.CSS_SELECTOR, "td a").text.strip() for r in rows]
    if len(listed) != 2 or payer_id not in listed:
        fail(f"the search lists payers {listed}, expected two, {payer_id} among them")
    if driver.find_element(By.ID, "search").get_attribute("value") != "3055":
        fail("the search box lost what was typed")
    shot("03-search", f"{len(listed)} payers")

    step = "payer"
    link = next(a for a in driver.find_elements(By.CSS_SELECTOR, "#payers td a")
                if a.text.strip() == payer_id)
    link.click()
    until(lambda: driver.find_elements(By.ID, "timeline")
          and driver.find_element(By.ID, "payer-id").text.strip() == payer_id,
          f"the payer {payer_id}'s page with its timeline did not open")
    if not driver.find_elements(By.CSS_SELECTOR, f'#payments tr[data-id="{payment_id}"]'):
        fail(f"the payment {payment_id} is not in #payments")
    cards = driver.find_element(By.ID, "cards").text
    if "3055" not in cards or "12/30" not in cards:
        fail(f"the card (…3055, 12/30) is not in #cards: {cards!r}")
    shot("04-payer")

    step = "refund"
    form = one(f"#payments form#refund-{payment_id}")
    Select(form.find_element(By.CSS_SELECTOR, "select[name=reason]")).select_by_value("service")
    form.find_element(By.NAME, "note").send_keys("кино не показывалось весь вечер (browser test)")
    amount = form.find_element(By.NAME, "amount").get_attribute("value")
    if roubles(amount) != "299.00":
        fail(f"the refund form offers {amount!r}, not the whole 299,00")
    into_view(form)
    shot("05-refund-filled", f"amount {amount}")
    submit(form)
    result = until(lambda: driver.find_element(By.ID, "result"), "no result page after the refund")
    message = result.text
    if "ждёт одобрения" not in message:
        fail(f"the refund does not wait for approval: {message!r}")
    asked = re.search(r"([0-9a-f]{8}-[0-9a-f-]{27})", message)
    approval_id = asked.group(1) if asked else None
    if not approval_id:
        fail(f"the result names no approval request: {message!r}")
    shot("06-refund-awaiting-approval", message)

    step = "signout"
    submit(driver.find_element(By.ID, "signout"))
    until(lambda: driver.find_elements(By.ID, "login"), "signing out did not lead to the sign-in form")
    driver.get(base + "/admin")
    until(lambda: driver.find_elements(By.ID, "login"), "the home page opens after signing out")
    shot("07-signed-out")

    step = "login-anna"
    sign_in("anna")
    until(lambda: "anna · accountant" in driver.find_element(By.CSS_SELECTOR, "header .me").text,
          "anna is not signed in as an accountant")
    shot("08-anna-home", "signed in as anna")

    step = "approvals"
    driver.get(base + "/admin/approvals")
    until(lambda: driver.find_elements(By.CSS_SELECTOR, "form[id^='approve-']"),
          "no approval form on /admin/approvals")
    form = one("form[id^='approve-']")
    form_id = form.get_attribute("id").removeprefix("approve-")
    if approval_id and form_id != approval_id:
        fail(f"the approval form is for {form_id}, the refund asked for {approval_id}")
    row = form.find_element(By.XPATH, "./ancestor::tr")
    if row.get_attribute("data-id") != form_id or "sveta" not in row.text:
        fail(f"the approval row does not show sveta's request: {row.text!r}")
    Select(form.find_element(By.CSS_SELECTOR, "select[name=reason]")).select_by_value("service")
    form.find_element(By.NAME, "note").send_keys("проверила по журналу сбоев (browser test)")
    shot("09-approvals", f"approval {form_id}")

    step = "approve"
    submit(form)
    result = until(lambda: driver.find_element(By.ID, "result"), "no result page after approving")
    if "Готово" not in result.text or "ok" not in (result.get_attribute("class") or ""):
        fail(f"the approval was not done: {result.text!r}")
    shot("10-approved", result.text)

    step = "refund-succeeded"
    deadline = time.time() + 60
    while True:
        driver.get(payer_page)
        until(lambda: driver.find_elements(By.ID, "refunds"), "no refunds table on the payer's page")
        done = [r for r in driver.find_elements(By.CSS_SELECTOR, "#refunds tr:has(td.succeeded)")]
        if done:
            break
        if time.time() > deadline:
            fail("the refund did not succeed within 60 s")
        time.sleep(0.5)
    refund_row = done[0].text
    if len(done) != 1 or "staff:sveta" not in refund_row or roubles(
            done[0].find_element(By.CSS_SELECTOR, "td.num").text) != "299.00":
        fail(f"the refunds table does not show sveta's 299,00 refund: {refund_row!r}")
    approvals = driver.find_element(By.ID, "approvals").text
    if "approved" not in approvals or "anna" not in approvals:
        fail(f"the payer's approvals do not show anna's approval: {approvals!r}")
    if driver.find_elements(By.CSS_SELECTOR, f"#refund-{payment_id}"):
        fail("the refunded payment still offers a refund")
    into_view(driver.find_element(By.ID, "refunds"))
    shot("11-refund-succeeded", refund_row)

    step = "payments"
    driver.get(base + "/admin/payments?status=succeeded")
    until(lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-id]"), "no payments listed")
    shown = {}
    for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-id]"):
        cells = r.find_elements(By.TAG_NAME, "td")
        if cells[2].text.strip() != "succeeded":
            fail(f"a {cells[2].text!r} payment in the succeeded list")
        shown[r.get_attribute("data-id")] = roubles(cells[3].text)
    if payment_id not in shown or len(shown) != 2:
        fail(f"the list shows {sorted(shown)}, expected both payers' payments")
    export = driver.find_element(By.ID, "export").get_attribute("href")
    if "/admin/payments.csv?" not in export or "status=succeeded" not in export:
        fail(f"the export link {export!r} does not carry the filter")
    got = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {credentials: 'same-origin'})
          .then(r => r.text().then(body =>
            done({status: r.status, type: r.headers.get('content-type') || '', body})))
          .catch(e => done({status: 0, type: '', body: String(e)}));
        """,
        "/admin/payments.csv?status=succeeded",
    )
    if got["status"] != 200 or not got["type"].startswith("text/csv"):
        fail(f"the CSV download answered {got['status']} {got['type']!r}: {got['body'][:500]!r}")
    rows = list(csv.DictReader(io.StringIO(got["body"].lstrip("\ufeff"))))
    exported = {r["id"]: r["amount_roubles"] for r in rows}
    if len(rows) != len(exported):
        fail(f"the CSV repeats ids: {[r['id'] for r in rows]}")
    if exported != shown:
        fail(f"the CSV {exported} is not what the page shows {shown}")
    if {r["status"] for r in rows} != {"succeeded"}:
        fail(f"the CSV has statuses {sorted({r['status'] for r in rows})}")
    ours = next(r for r in rows if r["id"] == payment_id)
    if ours["refunded_kopecks"] != "29900" or ours["payer_id"] != payer_id:
        fail(f"the CSV's row for the payment is {ours}")
    shot("12-payments", f"{len(shown)} rows on the page, {len(rows)} in the CSV")

    step = "payer-en"
    driver.get(payer_page + "?lang=en")
    until(lambda: driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
          and "Timeline" in text() and "Refunds" in text(),
          "the payer's page is not in English")
    shot("13-payer-en")


try:
    run()
except SystemExit:
    raise
except Exception as e:
    fail(f"{type(e).__name__}: {e}")
driver.quit()
