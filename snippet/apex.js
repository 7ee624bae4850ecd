/*! apex.js, Apex Ingest's browser snippet (ES2015), built from snippet/apex.js: docs/snippet.md */
((w, d) => {
'use strict';
const nav = navigator, loc = location, old = w.apex, NUL = /\u0000/g, FIELD = /^(INPUT|SELECT|TEXTAREA)$/;
const UK = 'apex_uid';
let s, api, key, vid, uid, last, lastRef, timer, busy, cl, out, tries = 0, off = 1, q = [], extra = [];

const dict = () => Object.create(null);
const attr = (n) => s && s.getAttribute('data-' + n);
const flag = (n) => attr(n) != null && attr(n) != 'false';
const on = (t, ev, fn, capture) => t.addEventListener(ev, (e) => { try { fn(e); } catch (x) {} }, capture);
const hex = (n) => [].map.call(w.crypto.getRandomValues(new Uint8Array(n)),
  (b) => (256 + b).toString(16).slice(1)).join('');
const QK = 'apex_q:' + hex(8);
const href = () => /^https?:/.test(loc.href) ? loc.href : loc.pathname;
// a query or fragment parameter named like a secret: its value becomes [redacted]
const red = (u) => (u = u || '').replace(/([?#].*)/, (q) => q.replace(/([?&#])([^=&#?]*)=([^&#]+)/g, (m, a, n) => {
  const k = n.trim().toLowerCase();
  return extra.includes(k) || /passw|pwd|secret|token|apikey|privatekey|sessionid|creditcard|cardnum|ccnum|cvv|cvc/
    .test(k.replace(/[\s_.-]/g, '')) || /(^|[^a-z\d])(pass|pin|auth(orization)?|card|cc|csc|ssn|sig(nature)?)([^a-z\d]|$)/
    .test(k) ? a + n + '=[redacted]' : m;
}));

const cut = (v, n) => {
  v = String(v == null ? '' : v).replace(NUL, '');
  return v.length > n ? v.slice(0, n).replace(/[\ud800-\udbff]$/, '') : v;
};
const clip = (v, n, depth) => {
  if (typeof v == 'string') return cut(v, n);
  if (!v || typeof v != 'object') return v;
  if (depth > 14) return null;
  const o = Array.isArray(v) ? [] : dict();
  for (const k of Object.keys(v).slice(0, n)) o[k.replace(NUL, '')] = clip(v[k], n, depth + 1);
  return o;
};
const fit = (data) => {
  let o;
  try { o = JSON.parse(JSON.stringify(data)); } catch (e) {}
  o = o == null ? {} : typeof o != 'object' || Array.isArray(o) ? { value: o } : o;
  for (let n = 32768; n > 8; n >>= 1) {
    data = clip(o, n, 1);
    if (new Blob([JSON.stringify(data)]).size < 30000) return data;
  }
  return { truncated: true };
};

const get = (k) => { try { return cl ? null : localStorage.getItem(k); } catch (e) {} };
const put = (k, v) => { try { if (!cl) localStorage.setItem(k, v); } catch (e) {} };
// the send queue (docs/snippet.md); sentAt: when this attempt leaves
const save = () => put(QK, JSON.stringify(q));
const at = (b) => b.slice(0, -1) + ',"sentAt":"' + new Date().toISOString() + '"}';
const go = () => {
  if (busy || !q.length) return;
  busy = 1;
  const b = q[0], next = (done, after) => {
    if (done) { busy = 0; if (q[0] == b) q.shift(); tries = 0; save(); go(); } else {
      timer = setTimeout(() => { busy = 0; go(); },
        Math.max(after * 1e3 || 0, (250 << Math.min(tries++, 7)) * (1 + Math.random())));
    }
  };
  fetch(api, {
    method: 'POST', body: at(b), keepalive: true, credentials: 'omit', headers: { 'Content-Type': 'text/plain' }
  }).then((r) => next(r.status != 408 && r.status != 429 && r.status < 500, +r.headers.get('Retry-After')),
    () => next());
};
const post = (body) => {
  if (q.push(body) > 100) q.shift();
  save();
  go();
};
const flush = () => q.forEach((b) => { try { nav.sendBeacon(api, at(b)); } catch (e) {} });
const send = (type, data) => {
  type = cut(type, 100).replace(/[\x00-\x1f\x7f-\x9f]/g, '');
  if (!off && !out && type) post(JSON.stringify({
    type, visitorId: vid, userId: uid || undefined, projectKey: key, url: cut(red(href()), 4096), referrer: cut(red(lastRef), 4096),
    data: fit(data), timestamp: new Date().toISOString(), id: hex(16)
  }));
};
const pv = (force) => {
  const u = href();
  if (u != last) { lastRef = last; last = u; } else if (!force) return;
  send('pageview', {});
};

const visitor = (fresh) => {
  const k = 'apex_vid';
  let v, ls;
  try { ls = localStorage; v = ls.getItem(k); } catch (e) {}
  try { v = v || (/(?:^|; *)apex_vid=([\w-]+)/.exec(d.cookie) || [])[1]; } catch (e) {}
  if (fresh || !/^[\w-]{1,128}$/.test(v || '')) v = hex(16);
  try { ls.setItem(k, v); } catch (e) {
    try {
      d.cookie = k + '=' + v + ';max-age=63072000;path=/;SameSite=Lax' + (loc.protocol == 'https:' ? ';Secure' : '');
    } catch (x) {}
  }
  return v;
};

const apexAttrs = (el, o) => {
  let n = 0;
  for (const at of el.attributes) {
    const m = /^data-apex-(.+)/.exec(at.name);
    if (m && m[1] != 'ignore') { n++; if (o) o[m[1]] = cut(at.value, 1000); }
  }
  return n;
};
const click = (e) => {
  const t = e.target, o = dict();
  let el = t;
  if (!t.closest || t.closest('[data-apex-ignore]')) return;
  // the nearest link, button, data-apex-* element or element with an id (not <body> nor its children)
  while (el && !apexAttrs(el) && !el.matches('a,button,input[type=submit],input[type=button],[role=button]') &&
    !(el.id && el.parentElement && el.parentElement != d.body && el != d.body)) el = el.parentElement;
  if (!el) return;
  const a = t.closest('a');
  o.id = el.getAttribute('id') || '';
  o.tag = el.tagName.toLowerCase();
  o.text = cut((el.tagName == 'INPUT' ? (/^(submit|button)$/.test(el.type) ? el.value : '')
    : FIELD.test(el.tagName) || el.isContentEditable ? '' : el.innerText || el.textContent).replace(/\s+/g, ' ').trim(), 100);
  o.href = red(a && typeof a.href == 'string' && a.href);
  apexAttrs(el, o);
  send('click', o);
};
const submit = (e) => {
  const f = e.target, fields = dict();
  if (f.tagName != 'FORM' || f.closest('[data-apex-ignore]')) return;
  for (const el of Object.getOwnPropertyDescriptor(HTMLFormElement.prototype, 'elements').get.call(f)) {
    const ty = String(el.type).toLowerCase(), n = el.getAttribute('name') || el.getAttribute('id');
    if (!n || !FIELD.test(el.tagName) || /^(password|hidden|file|submit|button|reset|image)$/.test(ty) ||
      /passw|^pass$|pwd|cvc|cvv|card.?num|ccnum|^ssn$/i.test(n) || el.matches(':disabled') ||
      /(^|\s)cc-/i.test(el.getAttribute('autocomplete')) || el.closest('[data-apex-ignore]') ||
      (/^(checkbox|radio)$/.test(ty) && !el.checked)) continue;
    const v = ty == 'select-multiple' ? [...el.selectedOptions].map((x) => cut(x.value, 1000)) : cut(el.value, 1000);
    fields[n] = n in fields ? [].concat(fields[n], v) : v;
  }
  send('form_submit', {
    id: f.getAttribute('id') || '', name: f.getAttribute('name') || '',
    action: red(new URL(f.getAttribute('action') || '', d.baseURI).href),
    method: (f.getAttribute('method') || 'get').toLowerCase(), fields
  });
};

// opted out (opt_out, or Global Privacy Control without opt_in): nothing is sent
const consent = (yes, k) => {
  if (k) put('apex_consent', yes);
  out = !yes;
  if (out) q.length && save(q = []); else if (!cl && !vid) apex.visitorId = vid = visitor();
};
const apex = (cmd, name, data) => {
  try {
    if (cmd == 'track') send(name, data);
    if (cmd == 'pageview') pv(1);
    if (!off && /^opt_(in|out)$/.test(cmd)) consent(+(cmd == 'opt_in'), 1);
    if (off || out) return;
    if (cmd == 'identify' && name && (name != uid || data)) send('identify', data, put(UK, uid = cut(name, 128)));
    if (cmd == 'reset' && !put(UK, uid = '') && !cl) apex.visitorId = vid = visitor(1);
  } catch (e) {}
};
apex.track = (name, data) => apex('track', name, data);
apex.pageview = () => apex('pageview');
apex.identify = (id, traits) => apex('identify', id, traits);
apex.reset = () => apex('reset');

try {
  if (old && old.loaded) return;
  apex.loaded = true;
  w.apex = apex;
  s = d.currentScript || d.querySelector('script[data-project-key]');
  key = attr('project-key');
  extra = (attr('redact') || '').toLowerCase().split(',').map((x) => x.trim()).filter(String);
  api = new URL(attr('api') || '/api/events', (s && s.src) || loc.href).href;
  if (!key || (flag('respect-dnt') && (nav.doNotTrack == '1' || nav.globalPrivacyControl === true))) return;
  cl = flag('cookieless');
  const c = get('apex_consent');
  uid = get(UK) || '';
  // a queue per page (tabs never overwrite each other's), adopting the others (removed first)
  try {
    for (const k of cl ? [] : Object.keys(localStorage)) if (/^apex_q(:\w+)?$/.test(k)) try {
      const v = get(k);
      localStorage.removeItem(k);
      q = q.concat(JSON.parse(v));
    } catch (e) {}
  } catch (e) {}
  q = q.filter((b) => typeof b == 'string');
  q.length && save(q = [...new Set(q)].slice(-100));
  consent(c ? +c : +(nav.globalPrivacyControl !== true));
  last = href();
  lastRef = d.referrer;
  off = 0;
  const early = [...(old && old.q) || []], opt = (a) => /^opt_/.test(a[0]);
  for (const a of early.filter(opt)) apex(...a); // queued consent first, before the pageview
  on(w, 'pagehide', flush);
  on(d, 'visibilitychange', () => { if (d.visibilityState == 'hidden') flush(); });
  if (attr('auto') != 'false') {
    if (d.prerendering) on(d, 'prerenderingchange', () => pv(1));
    else pv(1);
    for (const m of ['pushState', 'replaceState']) {
      const f = history[m];
      history[m] = function (...args) {
        const r = f.apply(this, args);
        try { pv(); } catch (e) {}
        return r;
      };
    }
    on(w, 'popstate', () => pv());
    on(w, 'hashchange', () => pv());
    on(w, 'pageshow', (e) => { if (e.persisted) pv(1); });
    on(d, 'click', click, true);
    on(d, 'submit', submit, true);
  }
  for (const a of early.filter((a) => !opt(a))) apex(...a);
  go();
} catch (e) {}
})(window, document);
