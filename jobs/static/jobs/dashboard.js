// The admin dashboard: polls the page's data URL once a second and draws the
// numbers, the two uPlot charts and the latest jobs. Plain script, no build.
(() => {
  "use strict";

  const POLL_MS = 1000;
  const CHART_HEIGHT = 200;
  // Fixed colours: the browser test looks for the bars' exact colour.
  const BLUE = "#417690";
  const RED = "#ba2121";

  const root = document.getElementById("dashboard");
  const statusLine = document.getElementById("dash-status");
  const tbody = document.querySelector("#latest-jobs tbody");
  const charts = {};
  let latest = null; // the last data drawn, to redraw after a theme change

  const cssVar = (name, fallback) =>
    getComputedStyle(document.body).getPropertyValue(name).trim() || fallback;

  function makeChart(id, unit, series) {
    const element = document.getElementById(id);
    const width = () => Math.max(200, element.clientWidth - 20);
    const fg = cssVar("--body-fg", "#333");
    const grid = { stroke: cssVar("--hairline-color", "#e8e8e8"), width: 1 };
    const chart = new uPlot(
      {
        width: width(),
        height: CHART_HEIGHT,
        scales: {
          // Half a minute of room each side, so the edge bars show whole.
          x: { time: true, range: (u, min, max) => [min - 30, max + 30] },
          // From zero, with some room above the highest value.
          y: { range: (u, min, max) => [0, Math.max(1, max) * 1.1] },
        },
        series: [{}, ...series],
        axes: [
          { stroke: fg, grid, ticks: grid },
          { stroke: fg, grid, ticks: grid, label: unit, size: 60 },
        ],
        cursor: { drag: { x: false, y: false } },
      },
      [[], ...series.map(() => [])],
      element,
    );
    chart.resizer = new ResizeObserver(() => {
      chart.setSize({ width: width(), height: CHART_HEIGHT });
    });
    chart.resizer.observe(element);
    return chart;
  }

  function setUp() {
    for (const chart of Object.values(charts)) {
      chart.resizer.disconnect();
      chart.destroy();
    }
    charts.published = makeChart("chart-published", "jobs", [
      {
        label: "published",
        stroke: BLUE,
        fill: BLUE,
        paths: uPlot.paths.bars({ size: [0.7, 24] }),
        points: { show: false },
      },
    ]);
    charts.latency = makeChart("chart-latency", "ms", [
      { label: "p50", stroke: BLUE, width: 2, spanGaps: false },
      { label: "max", stroke: RED, width: 1, spanGaps: false },
    ]);
  }

  function show(id, text, bad = false) {
    const element = document.getElementById(id);
    element.textContent = text;
    element.classList.toggle("dash-bad", Boolean(bad));
  }

  function age(seconds) {
    if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
    return `${Math.round(seconds / 3600)} h`;
  }

  const since = (iso, now) => (iso ? `${age(now - Date.parse(iso) / 1000)} ago` : "never");
  const number = (value) => (value === null || value === undefined ? "?" : String(value));

  function drawPoller(poller, now) {
    const rows = ["poller-last-poll", "poller-last-error", "poller-rate-limits"];
    if (!poller || poller.error) {
      show("poller-state", poller ? "status unreadable" : "no report yet", true);
      rows.forEach((id) => show(id, "–"));
      return;
    }
    let state = poller.state || "?";
    if (poller.stale) state += `, silent for ${age(poller.report_age_seconds || 0)}`;
    show("poller-state", state, poller.stale || poller.state !== "running");
    show("poller-last-poll", since(poller.last_poll_at, now));
    const error = poller.last_error || poller.publish_error;
    show(
      "poller-last-error",
      error ? `${error} (${since(poller.last_error_at, now)})` : "none",
      Boolean(error),
    );
    show(
      "poller-rate-limits",
      `${number(poller.rate_limited)} hit, ${number(poller.rate_limit_wait_seconds)} s waited`,
    );
  }

  function cell(content, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.append(content); // text, never markup
    return td;
  }

  function drawJobs(jobs) {
    const rows = jobs.map((job) => {
      const tr = document.createElement("tr");
      tr.dataset.jobId = job.job_id;
      const link = document.createElement("a");
      link.href = root.dataset.jobUrl.replace("/0/", `/${job.id}/`);
      link.textContent = job.id;
      tr.append(
        cell(link, "dash-num"),
        cell(job.job_id),
        cell(job.channel),
        cell(job.status),
        cell(age(job.age_seconds), "dash-num"),
        cell(job.latency_ms === null ? "–" : `${job.latency_ms} ms`, "dash-num"),
      );
      return tr;
    });
    tbody.replaceChildren(...rows);
  }

  function draw(data) {
    latest = data;
    show("queue-depth", number(data.queue.depth), data.queue.depth === null);
    show("queue-backend", `${data.queue.backend} queue`);
    show("clients-total", number(data.clients.total), data.clients.total === null);
    show("clients-process", `${data.clients.process} on this server`);
    const c = data.charts;
    charts.published.setData([c.minutes, c.published]);
    charts.latency.setData([c.minutes, c.latency_p50_ms, c.latency_max_ms]);
    drawPoller(data.poller, data.now);
    drawJobs(data.latest_jobs);
    statusLine.textContent = `Updated ${new Date(data.now * 1000).toLocaleTimeString()}.`;
    statusLine.classList.remove("dash-error");
  }

  async function fetchData() {
    let response;
    try {
      response = await fetch(root.dataset.url, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
    } catch {
      throw new Error("Cannot reach the gateway.");
    }
    const type = response.headers.get("Content-Type") || "";
    // An ended session answers with the login page, after a redirect.
    if (response.redirected || !type.startsWith("application/json")) {
      throw new Error("Signed out: reload the page to log in again.");
    }
    if (!response.ok) throw new Error(`The gateway answered ${response.status}.`);
    return response.json();
  }

  async function poll() {
    try {
      // A hidden tab asks for nothing; it catches up when shown again.
      if (!document.hidden) draw(await fetchData());
    } catch (error) {
      statusLine.textContent = `${error.message} Retrying…`;
      statusLine.classList.add("dash-error");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  setUp();
  poll();
  // The admin's theme toggle: the charts take their colours anew.
  new MutationObserver(() => {
    setUp();
    if (latest) draw(latest);
  }).observe(document.documentElement, { attributeFilter: ["data-theme"] });
})();
