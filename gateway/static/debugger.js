// The Apex event debugger: follows /debugger/feed (Server-Sent Events read with fetch, so that
// the secret key travels in a header, never in a URL) and lists events and rejected events,
// newest first. The key is kept in this tab's sessionStorage only.
(function () {
  'use strict';
  var KEY = 'apex-debugger-secret';
  var MAX_ITEMS = 1000;
  var $ = function (id) { return document.getElementById(id); };
  var feed = $('feed');
  var status = $('status');
  var items = [];
  var afterEvent = 0;
  var afterLetter = 0;
  var session = 0; // bumped on every (re)connect by the user: older loops stop

  function setStatus(text, error) {
    status.textContent = text;
    status.className = error ? 'error' : '';
  }

  function text(value) { return value === undefined || value === null ? '' : String(value); }

  function matches(item) {
    var type = $('filter-type').value.trim();
    var visitor = $('filter-visitor').value.trim();
    if (item.kind === 'event' && !$('show-events').checked) return false;
    if (item.kind === 'dead_letter' && !$('show-rejected').checked) return false;
    if (type && item.type.indexOf(type) === -1) return false;
    if (visitor && item.visitor.indexOf(visitor) === -1) return false;
    return true;
  }

  function describe(raw) {
    if (raw.kind === 'event') {
      var data = raw.data;
      try { data = JSON.parse(raw.data); } catch (e) { /* kept as text */ }
      var shown = {};
      for (var k in raw) if (k !== 'kind') shown[k] = raw[k];
      shown.data = data;
      return { kind: 'event', id: raw.id, type: text(raw.type), visitor: text(raw.visitor_id),
               url: text(raw.url), time: text(raw.received_at), reasons: '', json: shown };
    }
    var event = {};
    try { event = JSON.parse(raw.event_json || '{}'); } catch (e) { event = {}; }
    var reasons = (raw.violations || []).map(function (v) {
      return v.field + ': ' + v.description;
    }).join('; ') || (raw.reason === 'permission_denied' ? 'origin not allowed'
                                                          : 'valid, refused with its request');
    var shown2 = {};
    for (var j in raw) if (j !== 'kind' && j !== 'event_json') shown2[j] = raw[j];
    shown2.event = event;
    return { kind: 'dead_letter', id: raw.id, type: text(event.type),
             visitor: text(event.visitor_id), url: text(event.url),
             time: text(raw.received_at), reasons: reasons, json: shown2 };
  }

  function render(item) {
    var li = document.createElement('li');
    li.className = item.kind;
    li.setAttribute('data-kind', item.kind);
    var line = document.createElement('div');
    line.className = 'line';
    [['kind', item.kind === 'event' ? 'event' : 'rejected'], ['time muted', item.time],
     ['type', item.type], ['visitor muted', item.visitor], ['url', item.url]]
      .forEach(function (pair) {
        var span = document.createElement('span');
        span.className = pair[0];
        span.textContent = pair[1];
        line.appendChild(span);
      });
    li.appendChild(line);
    if (item.reasons) {
      var reasons = document.createElement('div');
      reasons.className = 'reasons';
      reasons.textContent = item.reasons;
      li.appendChild(reasons);
    }
    var pre = document.createElement('pre');
    pre.textContent = JSON.stringify(item.json, null, 2);
    li.appendChild(pre);
    li.addEventListener('click', function (e) {
      if (e.target.tagName !== 'PRE') li.classList.toggle('open');
    });
    item.node = li;
    li.hidden = !matches(item);
    return li;
  }

  function add(raw) {
    var item = describe(raw);
    if (raw.kind === 'event') afterEvent = Math.max(afterEvent, raw.id);
    else afterLetter = Math.max(afterLetter, raw.id);
    items.unshift(item);
    feed.insertBefore(render(item), feed.firstChild); // newest first
    while (items.length > MAX_ITEMS) {
      var old = items.pop();
      if (old.node && old.node.parentNode) old.node.parentNode.removeChild(old.node);
    }
  }

  function refilter() {
    items.forEach(function (item) { item.node.hidden = !matches(item); });
  }

  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }

  async function follow(secret, mine) {
    var backlog = 50;
    while (mine === session) {
      var url = '/debugger/feed?after_event=' + afterEvent + '&after_dead_letter=' + afterLetter +
        '&backlog=' + (afterEvent || afterLetter ? 0 : backlog);
      var response;
      try {
        response = await fetch(url, { headers: { 'X-Apex-Secret-Key': secret },
                                      cache: 'no-store', credentials: 'omit' });
      } catch (e) {
        setStatus('Connection lost; retrying...', true);
        await sleep(2000);
        continue;
      }
      if (response.status === 401 || response.status === 403) {
        var body = {};
        try { body = await response.json(); } catch (e) { body = {}; }
        setStatus((body.error && body.error.message) || 'This key cannot read events.', true);
        sessionStorage.removeItem(KEY);
        return;
      }
      if (!response.ok || !response.body) {
        setStatus('The gateway answered ' + response.status + '; retrying...', true);
        await sleep(2000);
        continue;
      }
      setStatus('Connected: live');
      backlog = 0;
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = '';
      try {
        for (;;) {
          var chunk = await reader.read();
          if (chunk.done || mine !== session) break;
          buffer += decoder.decode(chunk.value, { stream: true });
          var parts = buffer.split('\n\n');
          buffer = parts.pop();
          parts.forEach(function (block) {
            var isError = /^event: error$/m.test(block);
            var data = block.split('\n').filter(function (l) { return l.indexOf('data: ') === 0; })
              .map(function (l) { return l.slice(6); }).join('\n');
            if (!data) return;
            if (isError) { setStatus('Feed error: ' + data + '; reconnecting...', true); return; }
            try { add(JSON.parse(data)); } catch (e) { /* a malformed item is skipped */ }
          });
        }
      } catch (e) {
        setStatus('Connection lost; retrying...', true);
        await sleep(1000);
      }
      if (mine !== session) { try { reader.cancel(); } catch (e) { /* gone */ } }
    }
  }

  function start(secret) {
    session += 1;
    items = [];
    feed.textContent = '';
    afterEvent = 0;
    afterLetter = 0;
    setStatus('Connecting...');
    follow(secret, session);
  }

  $('connect').addEventListener('submit', function (e) {
    e.preventDefault();
    var secret = $('secret').value.trim();
    if (!secret) { setStatus('Enter a secret key (sk_live_...).', true); return; }
    sessionStorage.setItem(KEY, secret);
    $('secret').value = '';
    start(secret);
  });
  $('forget').addEventListener('click', function () {
    sessionStorage.removeItem(KEY);
    session += 1;
    setStatus('Not connected');
  });
  ['filter-type', 'filter-visitor'].forEach(function (id) {
    $(id).addEventListener('input', refilter);
  });
  ['show-events', 'show-rejected'].forEach(function (id) {
    $(id).addEventListener('change', refilter);
  });
  var saved = sessionStorage.getItem(KEY);
  if (saved) start(saved);
})();
