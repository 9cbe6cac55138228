// A message's text as DOM nodes: runs of text that keep their line breaks, and ``` code blocks.
// Built with createElement and text nodes only: text from users and the model is never HTML.

const FENCE = /^ {0,3}```\s*([^`\s]*)/;
const CLOSING_FENCE = /^ {0,3}```\s*$/;

/** The blocks of a text: [{kind: "text" | "code", language, text}], in order. */
export function blocksOf(text) {
  const blocks = [];
  let block = null;
  for (const line of text.replace(/\r\n?/g, "\n").split("\n")) {
    if (block && block.kind === "code") {
      if (CLOSING_FENCE.test(line)) block = null;
      else block.lines.push(line);
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      block = { kind: "code", language: fence[1], lines: [] };
      blocks.push(block);
    } else {
      if (!block) {
        block = { kind: "text", language: "", lines: [] };
        blocks.push(block);
      }
      block.lines.push(line);
    }
  }
  return blocks
    .map(({ kind, language, lines }) => ({
      kind, language, text: kind === "text" ? lines.join("\n").replace(/^\n+|\n+$/g, "") : lines.join("\n"),
    }))
    .filter((block) => block.kind === "code" || block.text.trim() !== "");
}

/** Show `text` in `container`, changing only what differs, so a streamed reply grows in place. */
export function renderText(container, text) {
  const blocks = blocksOf(text);
  const shown = [...container.children];
  let same = 0;
  while (same < blocks.length && same < shown.length && fits(shown[same], blocks[same])) {
    setText(textNodeOf(shown[same]), blocks[same].text);
    same++;
  }
  shown.slice(same).forEach((node) => node.remove());
  blocks.slice(same).forEach((block) => container.append(blockNode(block)));
}

/** Whether a shown node is of the block's kind (and language), so only its text may differ. */
function fits(node, block) {
  return node.dataset.kind === block.kind && (node.dataset.language || "") === block.language;
}

/** A node for one block: a paragraph, or a labelled code block. */
function blockNode(block) {
  let node;
  if (block.kind === "code") {
    node = document.createElement("div");
    node.className = "code-block";
    if (block.language) {
      node.dataset.language = block.language;
      const label = document.createElement("span");
      label.className = "code-language";
      label.textContent = block.language;
      node.append(label);
    }
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.append(document.createTextNode(block.text));
    pre.append(code);
    node.append(pre);
  } else {
    node = document.createElement("p");
    node.className = "text";
    node.append(document.createTextNode(block.text));
  }
  node.dataset.kind = block.kind;
  return node;
}

/** The text node a block's text lives in. */
function textNodeOf(node) {
  return node.dataset.kind === "code" ? node.querySelector("code").firstChild : node.firstChild;
}

/** Set a text node's text, appending when it only grew (what a live region announces). */
function setText(textNode, text) {
  if (textNode.data === text) return;
  if (text.startsWith(textNode.data)) textNode.appendData(text.slice(textNode.data.length));
  else textNode.data = text;
}
