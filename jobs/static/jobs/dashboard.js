// The admin dashboard: polls the page's data URL once a second and draws the
// numbers, the two uPlot charts and the latest jobs. Plain script, no build.
(() => {
  "use strict";

  const POLL_MS = 1000;
  const CHART_HEIGHT = 200;
  // Five powers of ten, from 1 ms to 100 s, need more room than a count.
  const LATENCY_HEIGHT = 280;
  // Fixed colours: the browser test looks for the bars' exact colour.
  const BLUE = "#417690";
  const LIGHT_BLUE = "#79aec8";
  const AMBER = "#d08a1c";
  const RED = "#ba2121";
  // A log scale has no zero: smaller latencies are drawn at this floor (the
  // legend still says what they are).
  const LATENCY_FLOOR_MS = 0.1;

  const root = document.getElementById("dashboard");
  const statusLine = document.getElementById("dash-status");
  const tbody = document.querySelector("#latest-jobs tbody");
  const charts = {};
  let latest = null; // the last data drawn, to redraw after a theme change
  // The charts, for the browser test and the console.
  window.gatewayDashboard = { charts };

  const cssVar = (name, fallback) =>
    getComputedStyle(document.body).getPropertyValue(name).trim() || fallback;

  // "4.2 ms", "380 ms", "1.25 s", "84.0 s".
  function ms(value) {
    if (value < 10) return `${value.toFixed(1)} ms`;
    if (value < 1000) return `${Math.round(value)} ms`;
    return `${(value / 1000).toFixed(value < 10000 ? 2 : 1)} s`;
  }

  // Tick labels of the log axis: "0.1 ms" … "100 ms", "1 s" ….
  function decade(value) {
    const exact = Number(value.toPrecision(1)); // 0.1, not 0.10000000000000002
    return exact < 1000 ? `${exact} ms` : `${exact / 1000} s`;
  }
  const isPowerOfTen = (value) => Math.abs(Math.log10(value) % 1) < 1e-9;

  // The legend shows the hovered minute or, with nothing hovered, the latest
  // minute that has data, rather than uPlot's "--".
  function latestIndex(u) {
    const values = u.data[1] || [];
    for (let i = values.length - 1; i >= 0; i--) {
      if (values[i] !== null && values[i] !== undefined) return i;
    }
    return null;
  }
  const shownIndex = (u, idx) => (idx === null || idx === undefined ? latestIndex(u) : idx);

  function minuteLegend(u, value, sidx, idx) {
    const i = shownIndex(u, idx);
    if (i === null) return "no data yet";
    const time = new Date(u.data[0][i] * 1000).toLocaleTimeString([], {
      hour: "2-digit",
      minute: "2-digit",
    });
    return idx === null || idx === undefined ? `${time} (latest)` : time;
  }

  // The value of series ``sidx`` at the shown minute, as given (the chart may
  // draw a latency at the floor), formatted; "–" for a minute without one.
  const valueLegend = (format) => (u, value, sidx, idx) => {
    const i = shownIndex(u, idx);
    const raw = i === null ? null : u.given[sidx][i];
    return raw === null || raw === undefined ? "–" : format(raw);
  };

  function makeChart(id, { height, yScale, yAxis, yFilter, series }) {
    const element = document.getElementById(id);
    const width = () => Math.max(200, element.clientWidth - 20);
    const fg = cssVar("--body-fg", "#333");
    const grid = { stroke: cssVar("--hairline-color", "#e8e8e8"), width: 1 };
    const yGrid = yFilter ? { ...grid, filter: yFilter } : grid;
    const chart = new uPlot(
      {
        width: width(),
        height,
        scales: {
          // Half a minute of room each side, so the edge bars show whole.
          x: { time: true, range: (u, min, max) => [min - 30, max + 30] },
          y: yScale,
        },
        series: [{ label: "minute", value: minuteLegend }, ...series],
        axes: [
          { stroke: fg, grid, ticks: grid },
          { stroke: fg, grid: yGrid, ticks: yGrid, size: 80, filter: yFilter, ...yAxis },
        ],
        cursor: { drag: { x: false, y: false } },
      },
      [[], ...series.map(() => [])],
      element,
    );
    chart.given = [[], ...series.map(() => [])];
    chart.resizer = new ResizeObserver(() => {
      chart.setSize({ width: width(), height });
    });
    chart.resizer.observe(element);
    return chart;
  }

  // Draw ``given`` ([x, ...series]); ``drawn`` maps a value to where it is drawn.
  function setChartData(chart, given, drawn = (value) => value) {
    chart.given = given;
    chart.setData([
      given[0],
      ...given.slice(1).map((values) =>
        values.map((value) => (value === null ? null : drawn(value))),
      ),
    ]);
  }

  function setUp() {
    for (const chart of Object.values(charts)) {
      chart.resizer.disconnect();
      chart.destroy();
    }
    charts.published = makeChart("chart-published", {
      height: CHART_HEIGHT,
      // From zero, with some room above the highest value.
      yScale: { range: (u, min, max) => [0, Math.max(1, max) * 1.1] },
      yAxis: { label: "jobs" },
      series: [
        {
          label: "published",
          stroke: BLUE,
          fill: BLUE,
          paths: uPlot.paths.bars({ size: [0.7, 24] }),
          points: { show: false },
          value: valueLegend(String),
        },
      ],
    });
    // Log scale: a job pulled a minute late must not flatten every other
    // point to zero; each power of ten gets the same height.
    const alone = (u, sidx) =>
      u.data[sidx].flatMap((value, i, values) =>
        value !== null && values[i - 1] == null && values[i + 1] == null ? [i] : [],
      );
    const line = (label, stroke, width, more = {}) => ({
      label,
      stroke,
      width,
      spanGaps: false,
      // No dots on lines, but a minute between two empty ones has no line.
      points: { show: true, size: 5, filter: alone },
      value: valueLegend(ms),
      ...more,
    });
    // Powers of ten only: the 2…9 of each decade would crowd the axis.
    const decades = (u, splits) => splits.map((value) => (isPowerOfTen(value) ? value : null));
    charts.latency = makeChart("chart-latency", {
      height: LATENCY_HEIGHT,
      yFilter: decades,
      yScale: {
        distr: 3,
        log: 10,
        range: (u, min, max) =>
          min > 0 && Number.isFinite(max)
            ? uPlot.rangeLog(min, Math.max(max, min * 10), 10, true)
            : [1, 1000],
      },
      yAxis: {
        label: "log scale",
        values: (u, splits) => splits.map((value) => (value === null ? null : decade(value))),
      },
      series: [
        line("p50", BLUE, 2),
        line("p90", LIGHT_BLUE, 2),
        line("p99", AMBER, 1.5),
        // The max stands out by its dots: often one job, alone in its minute.
        line("max", RED, 1, { dash: [4, 3], points: { show: true, size: 5, fill: RED } }),
      ],
    });
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
      tr.dataset.deliveredBy = job.delivered_by || "";
      const link = document.createElement("a");
      link.href = root.dataset.jobUrl.replace("/0/", `/${job.id}/`);
      link.textContent = job.id;
      tr.append(
        cell(link, "dash-num"),
        cell(job.job_id),
        cell(job.channel),
        cell(job.state, "dash-state"),
        cell(age(job.age_seconds), "dash-num"),
        cell(job.latency_ms === null ? "–" : ms(job.latency_ms), "dash-num"),
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
    setChartData(charts.published, [c.minutes, c.published]);
    setChartData(
      charts.latency,
      [c.minutes, c.latency_p50_ms, c.latency_p90_ms, c.latency_p99_ms, c.latency_max_ms],
      (value) => Math.max(value, LATENCY_FLOOR_MS),
    );
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
