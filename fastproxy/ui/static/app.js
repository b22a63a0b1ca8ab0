// The status page's script: polls /ui/api/status and redraws the tables and charts.
// Values go into the page as text (textContent), never as HTML.
"use strict";
(function () {
  var POLL_MS = 2000;
  var SVG = "http://www.w3.org/2000/svg";

  function clock(unix) {
    return unix ? new Date(unix * 1000).toISOString().substring(11, 19) : null;
  }

  function fill(id, rows, empty) {
    var body = document.querySelector("#" + id + " tbody");
    var fresh = document.createElement("tbody");
    rows.forEach(function (cells) {
      var tr = document.createElement("tr");
      cells.forEach(function (cell, i) {
        var td = document.createElement("td");
        var value = typeof cell === "object" && cell !== null ? cell.text : cell;
        td.textContent = value === null || value === undefined || value === "" ? "\u2013" : String(value);
        if (typeof cell === "object" && cell !== null && cell.cls) { td.className = cell.cls; }
        tr.appendChild(td);
      });
      fresh.appendChild(tr);
    });
    if (!rows.length) {
      var tr = document.createElement("tr"), td = document.createElement("td");
      td.textContent = empty;
      tr.appendChild(td);
      fresh.appendChild(tr);
    }
    body.parentNode.replaceChild(fresh, body);
  }

  function chart(id, values, bucket) {
    var svg = document.getElementById(id);
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var top = Math.max.apply(null, values.concat([1]));
    var step = 300 / Math.max(values.length - 1, 1);
    var points = values.map(function (v, i) {
      return (i * step).toFixed(1) + "," + (58 - (v / top) * 50).toFixed(1);
    });
    var line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.appendChild(line);
    var label = document.createElementNS(SVG, "text");
    label.setAttribute("x", "2");
    label.setAttribute("y", "7");
    label.textContent = "max " + top + "/s, now " + values[values.length - 1] + "/s (" + bucket + " s points)";
    svg.appendChild(label);
  }

  function draw(doc) {
    fill("clusters", doc.clusters.map(function (c) {
      return [c.name, { text: c.phase, cls: c.phase }, c.version,
              c.latencyMs === null ? null : c.latencyMs + " ms", c.watches, c.tunnels, c.message];
    }), "no clusters configured");
    fill("namespaces", doc.namespaces.map(function (n) {
      return [n.cluster, n.namespace, clock(n.lastActivity), n.subject, n.verb, n.resource];
    }), "no activity recorded");
    fill("denials", doc.denials.map(function (d) {
      return [clock(d.time), d.code, d.user, d.method + " " + d.path, d.sourceIP, d.message];
    }), "no denials");
    if (doc.rates) {
      chart("chart-requests", doc.rates.requests, doc.rates.bucketSeconds);
      chart("chart-errors", doc.rates.errors, doc.rates.bucketSeconds);
    }
    document.getElementById("updated").textContent = clock(doc.generated);
    document.getElementById("state").className = "note";
  }

  function poll() {
    fetch("/ui/api/status", { credentials: "same-origin", cache: "no-store" }).then(function (response) {
      if (response.status === 401 || response.status === 403) {
        window.location.reload();  // the session ended: the server shows the sign-in form
        return null;
      }
      if (!response.ok) { throw new Error("status " + response.status); }
      return response.json();
    }).then(function (doc) {
      if (doc) { draw(doc); }
    }).catch(function () {
      document.getElementById("state").className = "note stale";
    }).then(function () {
      window.setTimeout(poll, POLL_MS);
    });
  }

  poll();
}());
