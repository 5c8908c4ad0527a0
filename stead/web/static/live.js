// Live regions: an element with data-fragment-url shows server-rendered HTML that this script
// replaces with a fresh copy of that fragment whenever something happens.
//
// "Something happens" is an event on the element's data-live-url (Server-Sent Events: the
// run's events, or the tenant's feed). Where there is no stream (no EventSource, the URL
// answers an error, the connection is refused), the fragment is fetched every
// data-refresh-ms instead. A fragment whose root says data-live-done="true" (a finished run)
// ends both. Without this script the pages work as they are, with a refresh link.
"use strict";
(function () {
  // Named SSE events that mean "refresh" besides the default "message" (set per element with
  // data-live-events="a b c").
  // These are the types Stead's streams send (GET /v1/runs/{id}/events: a run's audit actions
  // and model.tokens / run.progress / run.ended; GET /v1/events: approvals and finished runs).
  var DEFAULT_EVENTS = ["message",
    "run.started", "stage.entered", "model.called", "model.failed", "model.deferred",
    "model.tokens", "tool.called", "tool.decided", "tool.executed", "approval.requested",
    "approval.reminded", "approval.escalated", "approval.expired", "approval.decided",
    "budget.raised", "budget.rejected", "document.indexed", "run.progress",
    "run.cancel_requested", "run.redriven", "run.completed", "run.failed", "run.cancelled",
    "run.ended", "stream.restarted"];

  function start(region) {
    var fragment = region.getAttribute("data-fragment-url");
    var streamUrl = region.getAttribute("data-live-url");
    var every = Math.max(200, parseInt(region.getAttribute("data-refresh-ms") || "5000", 10));
    var names = (region.getAttribute("data-live-events") || "").split(/\s+/).filter(Boolean);
    var status = document.querySelector("[data-live-status]");
    var timer = null, source = null, inFlight = false, again = false, stopped = false;

    function say(text) { if (status) { status.textContent = text; } }

    function done() {
      var root = region.firstElementChild;
      return root !== null && root.getAttribute("data-live-done") === "true";
    }

    function stop() {
      stopped = true;
      if (timer !== null) { clearInterval(timer); timer = null; }
      if (source !== null) { source.close(); source = null; }
    }

    function refresh() {
      if (stopped) { return; }
      if (inFlight) { again = true; return; }
      inFlight = true;
      fetch(fragment, { headers: { "X-Stead-Fragment": "1" }, credentials: "same-origin" })
        .then(function (r) {
          if (!r.ok) { throw new Error("HTTP " + r.status); }
          return r.text();
        })
        .then(function (html) {
          region.innerHTML = html;
          say("Updated " + new Date().toLocaleTimeString() + "; ");
          if (done()) { stop(); }
        })
        .catch(function () { say("Live updates stopped; "); stop(); })
        .then(function () {
          inFlight = false;
          if (again) { again = false; refresh(); }
        });
    }

    function poll() {
      if (source !== null) { source.close(); source = null; }
      if (timer === null && !stopped) {
        region.setAttribute("data-live-mode", "poll");
        timer = setInterval(refresh, every);
        say("Refreshing every " + Math.round(every / 1000) + " s; ");
      }
    }

    if (done()) { return; }
    if (!streamUrl || typeof window.EventSource !== "function") { poll(); return; }
    source = new EventSource(streamUrl);
    source.onopen = function () {
      region.setAttribute("data-live-mode", "stream");
      say("Live; ");
    };
    DEFAULT_EVENTS.concat(names).forEach(function (name) {
      source.addEventListener(name, refresh);
    });
    // A stream that fails for good (an error status, no such URL) is CLOSED; one that drops
    // reconnects by itself, and the page catches up when it is back.
    source.onerror = function () {
      if (source !== null && source.readyState === EventSource.CLOSED) { poll(); }
      else { refresh(); }
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    var regions = document.querySelectorAll("[data-fragment-url]");
    for (var i = 0; i < regions.length; i++) { start(regions[i]); }
  });
})();
