// The conversation list: the caller's conversations, newest first, a page more as the list
// scrolls to its end; open, rename and delete (after a confirmation).

import * as api from "./api.js";

const $ = (id) => document.getElementById(id);
const WHEN = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "numeric", minute: "2-digit" });

/** A readable title, for conversations whose title is empty. */
export function titleOf(conversation) {
  return conversation.title && conversation.title.trim() ? conversation.title : "Untitled conversation";
}

export class ConversationList {
  /** `onOpen(id, title)` opens a conversation; `onRenamed(conversation)`, `onDeleted(id)` hear of changes. */
  constructor({ onOpen, onRenamed, onDeleted }) {
    this.list = $("conversation-list");
    this.more = $("more-conversations");
    this.status = $("list-status");
    this.onOpen = onOpen;
    this.onRenamed = onRenamed;
    this.onDeleted = onDeleted;
    this.cursor = null;
    this.loading = null;
    this.selected = null;
    this.target = null;
    this.more.addEventListener("click", () => this.loadMore());
    this.watcher = new IntersectionObserver((seen) => {
      if (seen.some((entry) => entry.isIntersecting)) this.loadMore();
    });
    this.watcher.observe(this.more);
    this.wireRenameDialog();
    this.wireDeleteDialog();
  }

  /** Empty the list and load its first page. */
  async reset() {
    this.list.replaceChildren();
    this.cursor = null;
    this.more.hidden = true;
    this.loading = null;
    await this.loadPage(null);
  }

  /** Load the next page, if there is one and none is loading. */
  loadMore() {
    if (this.loading || !this.cursor) return this.loading;
    return this.loadPage(this.cursor);
  }

  /** Fetch a page after `cursor` and append it (errors shown under the list; 401 thrown). */
  loadPage(cursor) {
    this.status.textContent = "";
    this.loading = api.listConversations(cursor)
      .then((page) => {
        page.conversations.forEach((conversation) => this.place(conversation, false));
        this.cursor = page.next_cursor;
        this.more.hidden = !this.cursor;
        if (!this.list.children.length) this.status.textContent = "No conversations yet.";
      })
      .catch((error) => {
        if (error.status === 401) throw error;
        this.status.textContent = `Could not load your conversations: ${error.message}.`;
      })
      .finally(() => {
        this.loading = null;
        // Watch afresh: if the end of the list is still in sight, the next page loads too.
        this.watcher.unobserve(this.more);
        this.watcher.observe(this.more);
      });
    return this.loading;
  }

  /** Put a conversation in the list (at the top when `first`), replacing its old entry. */
  place(conversation, first = true) {
    const old = this.itemOf(conversation.id);
    const item = this.item(conversation);
    if (first) {
      if (old) old.remove();
      this.list.prepend(item);
    } else if (old) {
      old.replaceWith(item);
    } else {
      this.list.append(item);
    }
    this.status.textContent = "";
    this.select(this.selected);
  }

  /** Take a conversation out of the list. */
  remove(id) {
    const item = this.itemOf(id);
    if (item) item.remove();
    if (!this.list.children.length && !this.cursor) this.status.textContent = "No conversations yet.";
  }

  /** Mark the open conversation (none with null). */
  select(id) {
    this.selected = id;
    for (const item of this.list.children) {
      const open = item.querySelector(".open");
      if (item.dataset.id === id) open.setAttribute("aria-current", "page");
      else open.removeAttribute("aria-current");
    }
  }

  /** The list item of a conversation, if shown. */
  itemOf(id) {
    return [...this.list.children].find((item) => item.dataset.id === id) || null;
  }

  /** A list item: the conversation's title and time, with rename and delete buttons. */
  item(conversation) {
    const title = titleOf(conversation);
    const item = document.createElement("li");
    item.className = "conversation";
    item.dataset.id = conversation.id;

    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    const name = document.createElement("span");
    name.className = "title";
    name.textContent = title;
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = WHEN.format(new Date(conversation.updated_at));
    open.append(name, when);
    open.addEventListener("click", () => this.onOpen(conversation.id, title));

    const rename = this.action("Rename", title, () => this.askRename(conversation.id, title));
    const remove = this.action("Delete", title, () => this.askDelete(conversation.id, title));
    const actions = document.createElement("span");
    actions.className = "actions-bar";
    actions.append(rename, remove);
    item.append(open, actions);
    return item;
  }

  /** A small button acting on one conversation, its label naming the conversation for screen readers. */
  action(verb, title, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `action ${verb.toLowerCase()}`;
    button.textContent = verb;
    button.setAttribute("aria-label", `${verb} “${title}”`);
    button.addEventListener("click", onClick);
    return button;
  }

  /** Open the rename dialog for a conversation. */
  askRename(id, title) {
    this.target = id;
    $("rename-input").value = title;
    $("rename-error").hidden = true;
    $("rename-dialog").showModal();
    $("rename-input").select();
  }

  /** Open the delete confirmation for a conversation. */
  askDelete(id, title) {
    this.target = id;
    $("delete-title").textContent = title;
    $("delete-error").hidden = true;
    $("delete-dialog").showModal();
    $("delete-cancel").focus();
  }

  /** Save a new title from the rename dialog. */
  wireRenameDialog() {
    const dialog = $("rename-dialog");
    $("rename-cancel").addEventListener("click", () => dialog.close());
    $("rename-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const title = $("rename-input").value.trim();
      if (!title) return showError("rename-error", "A title needs at least one character.");
      try {
        const conversation = await api.renameConversation(this.target, title);
        this.place(conversation, false);
        dialog.close();
        this.focusItem(conversation.id);
        this.onRenamed(conversation);
      } catch (error) {
        if (error.status === 401) return dialog.close();
        showError("rename-error", `Could not rename it: ${error.message}.`);
      }
    });
  }

  /** Delete once the user confirms in the dialog. */
  wireDeleteDialog() {
    const dialog = $("delete-dialog");
    $("delete-cancel").addEventListener("click", () => dialog.close());
    $("delete-confirm").addEventListener("click", async () => {
      const id = this.target;
      try {
        await api.deleteConversation(id);
        dialog.close();
        this.remove(id);
        this.onDeleted(id);
        this.status.textContent = "Conversation deleted.";
      } catch (error) {
        if (error.status === 401) return dialog.close();
        showError("delete-error", `Could not delete it: ${error.message}.`);
      }
    });
  }

  /** Put the keyboard focus back on a conversation's entry. */
  focusItem(id) {
    const item = this.itemOf(id);
    if (item) item.querySelector(".open").focus();
  }
}

/** Show a sentence in an error paragraph. */
function showError(id, sentence) {
  const paragraph = $(id);
  paragraph.textContent = sentence;
  paragraph.hidden = false;
}
