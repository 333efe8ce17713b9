// caddy-fleet dashboard: keeps the server-rendered page live.
//
// Every value shown comes from agents, which are not trusted: this file
// only ever builds nodes with createElement and sets textContent (never
// innerHTML or attributes from data), and the page's Content-Security-Policy
// runs no other script.
'use strict';
(function () {
  const PAGE = 50;
  const $ = (id) => document.getElementById(id);
  // Relative to the page (it may be served under a prefix), without the
  // credentials a URL may carry (fetch refuses them; the browser sends the
  // page's own authentication anyway).
  const at = (path) => {
    const u = new URL(path, document.baseURI);
    u.username = '';
    u.password = '';
    return u;
  };

  const model = { summary: null, sites: [], agents: [], refused: [], pushes: [] };
  const asked = new URLSearchParams(window.location.search);
  const pages = {
    sites: Number(asked.get('sites')) || 1,
    agents: Number(asked.get('agents')) || 1,
    refused: Number(asked.get('refused')) || 1,
    timeline: 1,
  };
  let sitesFilter = ($('sites-q') && $('sites-q').value.trim().toLowerCase()) || '';
  const timeline = { query: null, lines: [], untilSeq: null, loading: false, live: false };

  function el(tag, text, className) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (className) e.className = className;
    return e;
  }
  function list(items) {
    const u = el('ul');
    for (const i of items) u.appendChild(el('li', i));
    return u;
  }
  function rfc3339(ms) {
    return new Date(ms).toISOString().replace(/\.\d{3}Z$/, 'Z');
  }
  function time(ms) {
    const t = el('time', rfc3339(ms));
    t.dateTime = rfc3339(ms);
    return t;
  }
  function td(content, className) {
    const c = el('td', null, className);
    if (content instanceof Node) c.appendChild(content);
    else c.textContent = content === undefined || content === null ? '–' : String(content);
    return c;
  }
  function rowHeader(text) {
    const th = el('th', text);
    th.scope = 'row';
    return th;
  }
  function tr(cells) {
    const r = el('tr');
    for (const c of cells) r.appendChild(c);
    return r;
  }
  function ms(v) {
    return v === null || v === undefined ? '–' : v + ' ms';
  }

  // Fills table `id` with one page of `rows`, and its pager.
  function fill(id, rows, build, paged) {
    const body = $(id + '-rows');
    if (!body) return;
    const columns = body.parentNode.querySelectorAll('thead th').length;
    const count = paged ? Math.max(1, Math.ceil(rows.length / PAGE)) : 1;
    if (paged) pages[id] = Math.min(Math.max(1, pages[id]), count);
    const shown = paged ? rows.slice((pages[id] - 1) * PAGE, pages[id] * PAGE) : rows;
    const frag = document.createDocumentFragment();
    if (shown.length === 0) {
      const c = el('td', body.dataset.empty);
      c.colSpan = columns;
      const r = el('tr', null, 'empty');
      r.appendChild(c);
      frag.appendChild(r);
    }
    for (const r of shown) frag.appendChild(build(r));
    body.replaceChildren(frag);
    if (paged) pager(id, count, rows.length);
  }

  function pager(id, count, total) {
    let nav = $(id + '-pager');
    if (!nav) {
      nav = el('nav', null, 'pager');
      nav.id = id + '-pager';
      nav.setAttribute('aria-label', id + ' pages');
      const table = $(id + '-table');
      table.parentNode.after(nav);
    }
    nav.hidden = count <= 1;
    const button = (label, to, disabled) => {
      const b = el('button', label);
      b.type = 'button';
      b.disabled = disabled;
      b.addEventListener('click', () => {
        pages[id] = to;
        render(id);
        const focus = $(id + '-pager').querySelector('button:not([disabled])');
        if (focus) focus.focus();
      });
      return b;
    };
    nav.replaceChildren(
      button('Previous', pages[id] - 1, pages[id] <= 1),
      el('span', ' Page ' + pages[id] + ' of ' + count + ' (' + total + ' rows) ', 'pos'),
      button('Next', pages[id] + 1, pages[id] >= count)
    );
  }

  function siteMatches(s) {
    if (!sitesFilter) return true;
    const f = sitesFilter;
    return (
      s.site.toLowerCase().includes(f) ||
      s.upstreams.some((u) => u.toLowerCase().includes(f)) ||
      s.containers.some((c) => c.agent.toLowerCase().includes(f) || c.container.toLowerCase().includes(f))
    );
  }

  const renderers = {
    summary() {
      const s = model.summary;
      if (!s) return;
      const set = (id, text, state) => {
        const e = $(id);
        if (!e) return;
        e.textContent = text;
        if (state) e.className = 'state ' + state;
      };
      set('sum-converged', s.converged ? 'converged' : 'converging', s.converged ? 'ok' : 'warn');
      set('sum-consumer', s.consumer_attached ? 'attached' : 'not attached', s.consumer_attached ? 'ok' : 'bad');
      set('sum-seq', s.folded_seq + ' / ' + s.last_seq);
      set('sum-lag', s.consumer_lag === null ? '–' : String(s.consumer_lag));
      set('sum-sites', String(s.sites));
      set('sum-agents', String(s.agents));
      set('sum-refused', String(s.refused), s.refused === 0 ? 'ok' : 'warn');
      set('sum-pushes', s.pushes_loaded + ' loaded, ' + s.pushes_failed + ' failed');
      const figures = $('pushes-figures');
      if (figures) {
        figures.textContent =
          s.pushes_loaded + ' loaded and ' + s.pushes_failed + ' failed since start; consumer lag ' +
          (s.consumer_lag === null ? 'unknown' : s.consumer_lag) + '.';
      }
      for (const id of ['sites', 'agents', 'refused']) {
        const c = $(id + '-count');
        if (c) c.textContent = '(' + s[id] + ')';
      }
      followTimeline();
    },
    sites() {
      fill('sites', model.sites.filter(siteMatches), (s) => {
        const since = el('ul');
        for (const c of s.containers) {
          const li = el('li');
          if (c.since_ms !== null && c.since_ms !== undefined) {
            const t = time(c.since_ms);
            t.title = 'sequence ' + c.since_seq;
            li.appendChild(t);
          } else {
            li.textContent = 'seq ' + c.since_seq;
          }
          since.appendChild(li);
        }
        const upstreams = td(list(s.upstreams));
        if (s.upstreams_by) upstreams.appendChild(el('p', s.upstreams_by, 'mode'));
        return tr([
          rowHeader(s.site),
          upstreams,
          td(list(s.containers.map((c) => c.container + ' on ' + c.agent))),
          td(since),
        ]);
      }, true);
    },
    agents() {
      fill('agents', model.agents, (a) => {
        const status = el('span', a.status, 'status st-' + a.status.replace(' ', '-'));
        return tr([
          rowHeader(a.agent),
          td(status),
          td(a.last_heartbeat_ms === null ? 'never' : time(a.last_heartbeat_ms)),
          td(a.containers, 'num'),
          td(a.host_address),
        ]);
      }, true);
    },
    refused() {
      fill('refused', model.refused, (r) =>
        tr([
          rowHeader(r.container),
          td(r.agent),
          td(el('span', r.by, 'by by-' + r.by)),
          td(r.reason, 'reason'),
        ]), true);
    },
    pushes() {
      fill('pushes', model.pushes, (p) =>
        tr([
          td(time(p.at_ms)),
          td(el('span', p.outcome, 'outcome ' + p.outcome)),
          td(ms(p.took_ms), 'num'),
          td(p.containers, 'num'),
          td(ms(p.since_change_ms), 'num'),
          td(p.error ? p.error + ' (retry in ' + ms(p.retry_in_ms) + ')' : '', 'reason'),
        ]), false);
    },
    timeline() {
      const newest = timeline.lines.slice().reverse();
      fill('timeline', newest, (l) => {
        const b = el('button', 'routes at ' + l.seq, 'link');
        b.type = 'button';
        b.addEventListener('click', () => {
          $('at').value = String(l.seq);
          loadRoutesAt();
          $('routes-at').scrollIntoView();
          $('at').focus();
        });
        return tr([td(l.time, 'nowrap'), td(l.seq, 'num'), td(l.agent), td(l.container), td(l.change), td(b, 'nowrap')]);
      }, true);
    },
  };
  function render(name) {
    renderers[name]();
  }

  // The live stream: one event per section that changed.
  function connect() {
    const live = $('live');
    const source = new EventSource(at('dashboard/events'));
    source.addEventListener('open', () => {
      live.textContent = 'Live: updates arrive as the applier changes.';
      live.className = 'ok';
    });
    source.addEventListener('error', () => {
      live.textContent = 'Live updates interrupted; reconnecting…';
      live.className = 'warn';
    });
    for (const name of Object.keys(model)) {
      source.addEventListener(name, (e) => {
        model[name] = JSON.parse(e.data);
        render(name);
      });
    }
  }

  async function getJson(path, params) {
    const u = at(path);
    for (const [k, v] of Object.entries(params)) if (v) u.searchParams.set(k, v);
    const response = await fetch(u, { headers: { Accept: 'application/json' } });
    const body = await response.json();
    if (!response.ok) throw new Error(body && body.error ? body.error : response.statusText);
    return body;
  }

  function timelineQuery() {
    const form = $('timeline-form');
    const q = {};
    for (const name of ['since', 'until', 'domain', 'agent', 'container']) q[name] = form.elements[name].value.trim();
    return q;
  }

  function setState(id, text, error) {
    const p = $(id);
    if (!p) return;
    p.replaceChildren(error ? el('span', text, 'error') : document.createTextNode(text));
  }

  async function loadTimeline() {
    const query = timelineQuery();
    timeline.query = query;
    timeline.loading = true;
    setState('timeline-state', 'Reading the log…');
    try {
      const t = await getJson('dashboard/timeline', query);
      if (timeline.query !== query) return;
      timeline.lines = t.lines;
      timeline.untilSeq = t.until_seq;
      timeline.live = !query.until || query.until === 'now';
      pages.timeline = 1;
      caption(t, t.lines.length);
      render('timeline');
    } catch (e) {
      setState('timeline-state', e.message, true);
    } finally {
      timeline.loading = false;
    }
    followTimeline();
  }

  function caption(t, n) {
    setState('timeline-state',
      n + ' changes up to sequence ' + timeline.untilSeq + (t.truncated ? ' (only the newest 1000)' : '') +
      (timeline.live ? '; new ones appear as they happen.' : '.'));
  }

  // New changes after what the timeline shows, once the applier has folded them.
  async function followTimeline() {
    const s = model.summary;
    if (!s || !timeline.live || timeline.loading || timeline.untilSeq === null) return;
    if (s.folded_seq <= timeline.untilSeq) return;
    const query = timeline.query;
    timeline.loading = true;
    try {
      const t = await getJson('dashboard/timeline', Object.assign({}, query, { since: String(timeline.untilSeq), until: '' }));
      if (timeline.query !== query) return;
      if (t.until_seq > timeline.untilSeq) {
        timeline.lines = timeline.lines.concat(t.lines.filter((l) => l.seq > timeline.untilSeq)).slice(-1000);
        timeline.untilSeq = t.until_seq;
        caption(t, timeline.lines.length);
        render('timeline');
      }
    } catch (e) {
      setState('timeline-state', e.message, true);
    } finally {
      timeline.loading = false;
    }
    if (timeline.query === query && model.summary.folded_seq > timeline.untilSeq) setTimeout(followTimeline, 500);
  }

  async function loadRoutesAt() {
    const point = $('at').value.trim() || 'now';
    setState('routes-at-state', 'Reading the log…');
    try {
      const r = await getJson('dashboard/routes', { at: point });
      setState('routes-at-state', 'Routes at sequence ' + r.seq + ': ' + r.routes.length + ' sites, ' + r.refused.length + ' refused.');
      fill('routes-at', r.routes, (row) =>
        tr([
          rowHeader(row.site),
          td(list(row.upstreams)),
          td(list(row.containers.map((c) => c.container + ' on ' + c.agent))),
          td(list(row.containers.map((c) => r.since[c.since_seq] || 'seq ' + c.since_seq))),
        ]), false);
    } catch (e) {
      setState('routes-at-state', e.message, true);
    }
  }

  function start() {
    const filter = $('sites-q');
    if (filter) {
      filter.form.addEventListener('submit', (e) => e.preventDefault());
      filter.addEventListener('input', () => {
        sitesFilter = filter.value.trim().toLowerCase();
        pages.sites = 1;
        render('sites');
      });
    }
    const form = $('timeline-form');
    if (form) {
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        loadTimeline();
      });
      loadTimeline();
    }
    const atInput = $('at');
    if (atInput) {
      atInput.form.addEventListener('submit', (e) => {
        e.preventDefault();
        loadRoutesAt();
      });
      if (atInput.value.trim()) loadRoutesAt();
    }
    $('live').textContent = 'Live: connecting…';
    connect();
  }

  start();
})();
