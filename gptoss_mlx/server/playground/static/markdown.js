// A small Markdown renderer that builds DOM nodes and never parses HTML: every piece of text
// the model wrote becomes a text node, so nothing in it can become an element or a script.
// Blocks: fenced code (highlighted), headings, lists, quotes, tables, rules, paragraphs.
// Inline: code, bold, italic, strikethrough, links and bare URLs (http and https only).

// An element with a class and text (set as text, never parsed).
export const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const TABLE_SEP = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;

// Quotes nest this deep at most; deeper ">"s stay text (a reply nested 3,000 deep overflowed the
// stack or crashed the tab, and a saved chat with it broke the page at each reload).
const MAX_QUOTE_DEPTH = 16;

export function renderMarkdown(text, depth = 0) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      const close = new RegExp(`^\\s{0,3}${m[1][0]}{${m[1].length},}\\s*$`);
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++; // the closing fence (or the end of a reply still streaming)
      out.append(codeBlock(body.join("\n"), m[2]));
    } else if ((m = HEADING.exec(line))) {
      out.append(inline(el(`h${Math.min(m[1].length + 2, 6)}`), m[2]));
      i++;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i++;
    } else if (QUOTE.test(line) && depth < MAX_QUOTE_DEPTH) {
      const body = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) body.push(m[1]);
      const quote = el("blockquote");
      quote.append(renderMarkdown(body.join("\n"), depth + 1));
      out.append(quote);
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const numbered = !BULLET.test(line);
      const pattern = numbered ? NUMBERED : BULLET;
      const list = el(numbered ? "ol" : "ul");
      if (numbered) list.start = Number(NUMBERED.exec(line)[1]);
      for (; i < lines.length && (m = pattern.exec(lines[i])); i++) {
        list.append(inline(el("li"), m[numbered ? 2 : 1]));
      }
      out.append(list);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
      const rows = [line];
      for (i += 2; i < lines.length && lines[i].includes("|"); i++) rows.push(lines[i]);
      out.append(table(rows));
    } else if (line.trim() === "") {
      i++;
    } else {
      const para = el("p");
      const body = [];
      for (; i < lines.length && lines[i].trim() !== "" && !startsBlock(lines, i, depth); i++) body.push(lines[i]);
      body.forEach((part, k) => {
        if (k) para.append(el("br"));
        inline(para, part);
      });
      out.append(para);
    }
  }
  return out;
}

function startsBlock(lines, i, depth) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || (QUOTE.test(line) && depth < MAX_QUOTE_DEPTH) ||
    BULLET.test(line) || NUMBERED.test(line) ||
    (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]));
}

function cells(row) {
  return row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function table(rows) {
  const node = el("table");
  rows.forEach((row, k) => {
    const tr = el("tr");
    for (const cell of cells(row)) tr.append(inline(el(k ? "td" : "th"), cell));
    node.append(tr);
  });
  const wrap = el("div", "table-wrap");
  wrap.append(node);
  return wrap;
}

// ---- inline ------------------------------------------------------------------------------
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3: bold
  /__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 4: bold
  /\*(?=[^\s*])([^*]*?[^\s*])\*/.source, // 5: italic
  /(?<!\w)_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/.source, // 6: italic
  /~~(?=\S)([\s\S]*?\S)~~/.source, // 7: strikethrough
  /\[([^\]\n]+)\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/.source, // 8, 9: link
  /(https?:\/\/[^\s<>()"'`]*[^\s<>()"'`.,;:!?\]])/.source, // 10: bare URL
].join("|"), "g");

export function safeUrl(href) {
  try {
    const url = new URL(href);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

// A link opening in a new tab, or null for anything but http(s).
function link(href) {
  const url = safeUrl(href);
  if (!url) return null;
  const a = el("a");
  a.href = url;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return a;
}

export function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    let node = null;
    if (m[2] !== undefined) node = el("code", null, m[2]);
    else if (m[3] !== undefined || m[4] !== undefined) node = inline(el("strong"), m[3] ?? m[4]);
    else if (m[5] !== undefined || m[6] !== undefined) node = inline(el("em"), m[5] ?? m[6]);
    else if (m[7] !== undefined) node = inline(el("del"), m[7]);
    else if (m[8] !== undefined) {
      node = link(m[9]);
      if (node) inline(node, m[8]);
    } else if (m[10] !== undefined) {
      node = link(m[10]);
      if (node) node.textContent = m[10]; // a URL's text is not Markdown
    }
    if (!node) continue; // a link to something other than http(s) stays text
    parent.append(document.createTextNode(text.slice(last, m.index)), node);
    last = m.index + m[0].length;
  }
  parent.append(document.createTextNode(text.slice(last)));
  return parent;
}

// ---- code --------------------------------------------------------------------------------
const KEYWORDS = new Set((
  "and as assert async await break case catch class const continue def default del do elif else " +
  "enum except export extends false False finally fn for from func function go if impl import in " +
  "interface is lambda let loop match mod mut new nil none None not null or pass pub raise return " +
  "self static struct super switch this throw true True try type typeof use var void while with yield"
).split(" "));
const TOKENS = new RegExp([
  /(#(?!include|define|!)[^\n]*|\/\/[^\n]*|\/\*[\s\S]*?\*\/|--[^\n]*)/.source, // 1: comment
  /("""[\s\S]*?"""|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`(?:\\.|[^`\\])*`)/.source, // 2: string
  /\b(0x[0-9a-fA-F_]+|\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)\b/.source, // 3: number
  /\b([A-Za-z_][A-Za-z0-9_]*)\b/.source, // 4: word
].join("|"), "g");

export function highlight(code, parent) {
  let last = 0;
  for (const m of code.matchAll(TOKENS)) {
    const kind = m[1] !== undefined ? "tok-comment" : m[2] !== undefined ? "tok-string"
      : m[3] !== undefined ? "tok-number" : KEYWORDS.has(m[4]) ? "tok-keyword" : null;
    if (!kind) continue;
    parent.append(document.createTextNode(code.slice(last, m.index)), el("span", kind, m[0]));
    last = m.index + m[0].length;
  }
  parent.append(document.createTextNode(code.slice(last)));
  return parent;
}

export function codeBlock(code, language) {
  const pre = el("pre", "code");
  if (language) pre.dataset.lang = language;
  pre.append(highlight(code, el("code")));
  return pre;
}
