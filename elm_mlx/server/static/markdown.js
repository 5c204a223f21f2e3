// A small, safe Markdown subset rendered by building DOM nodes: model text only ever becomes
// text nodes (textContent), never HTML. Supported: fenced code blocks, headings, bullet and
// numbered lists, block quotes, paragraphs with line breaks, `inline code`, **bold**, *italic*.
// Anything else (links, images, raw HTML) stays visible as the literal text the model wrote.

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*)/g;

function inline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) parent.append(document.createTextNode(text.slice(last, match.index)));
    const token = match[0];
    let node;
    if (match[1]) {
      node = document.createElement("code");
      node.textContent = token.slice(1, -1);
    } else if (match[2]) {
      node = document.createElement("strong");
      node.textContent = token.slice(2, -2);
    } else {
      node = document.createElement("em");
      node.textContent = token.slice(1, -1);
    }
    parent.append(node);
    last = match.index + token.length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function lines(parent, tag, textLines) {
  const node = document.createElement(tag);
  textLines.forEach((line, i) => {
    if (i) node.append(document.createElement("br"));
    inline(node, line);
  });
  parent.append(node);
}

const FENCE = /^\s*```/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;

export function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const all = text.split("\n");
  let i = 0;
  while (i < all.length) {
    const line = all[i];
    if (FENCE.test(line)) {
      const code = [];
      i++;
      while (i < all.length && !FENCE.test(all[i])) code.push(all[i++]);
      i++; // the closing fence (absent while an answer is still streaming)
      const pre = document.createElement("pre");
      const node = document.createElement("code");
      node.textContent = code.join("\n");
      pre.append(node);
      root.append(pre);
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const level = Math.min(6, heading[1].length + 2); // h3..h6: an answer's headings stay smaller than the page's
      lines(root, "h" + level, [heading[2]]);
      i++;
      continue;
    }
    const pattern = BULLET.test(line) ? BULLET : NUMBERED.test(line) ? NUMBERED : null;
    if (pattern) {
      const list = document.createElement(pattern === BULLET ? "ul" : "ol");
      while (i < all.length && pattern.test(all[i])) {
        const item = document.createElement("li");
        inline(item, pattern.exec(all[i++])[1]);
        list.append(item);
      }
      root.append(list);
      continue;
    }
    if (QUOTE.test(line)) {
      const quoted = [];
      while (i < all.length && QUOTE.test(all[i])) quoted.push(QUOTE.exec(all[i++])[1]);
      lines(root, "blockquote", quoted);
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const paragraph = [];
    while (i < all.length && all[i].trim() && !FENCE.test(all[i]) && !HEADING.test(all[i]) && !BULLET.test(all[i]) &&
           !NUMBERED.test(all[i]) && !QUOTE.test(all[i])) {
      paragraph.push(all[i++]);
    }
    lines(root, "p", paragraph);
  }
  return root;
}
