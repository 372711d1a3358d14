// Jarvis Argus: adds "No account? Sign up" under Chainlit's login form, and shows
// the server's message when POST /login answers 429 ("Too many failed sign-in
// attempts..."), 413 (form too large) or 503 ("Storage is unavailable right now..."). Loaded by `custom_js = "/public/signup-link.js"`
// in .chainlit/config.toml. The login page is rendered by React, so a
// MutationObserver re-adds the link whenever the form is (re)drawn.
(function () {
  "use strict";
  var LINK_ID = "argus-signup-link";
  var NOTICE_ID = "argus-login-notice";

  function base() {
    // Chainlit may run under a root path ("/chat/login" -> "/chat").
    return window.location.pathname.replace(/\/login\/?$/, "");
  }

  function onLoginPage() {
    return /\/login\/?$/.test(window.location.pathname);
  }

  function loginForm() {
    var pw = document.querySelector('form input[type="password"]');
    return pw ? pw.closest("form") : null;
  }

  function addLink() {
    var existing = document.getElementById(LINK_ID);
    if (!onLoginPage()) {
      if (existing) existing.remove();
      return;
    }
    var form = loginForm();
    if (!form || (existing && existing.previousElementSibling === form)) return;
    if (existing) existing.remove();
    var p = document.createElement("p");
    p.id = LINK_ID;
    p.dir = "auto";
    p.style.cssText = "text-align:center;font-size:.875rem;margin-top:1rem;";
    p.appendChild(document.createTextNode("No account? "));
    var a = document.createElement("a");
    a.href = base() + "/signup";
    a.textContent = "Sign up";
    a.style.cssText = "text-decoration:underline;text-underline-offset:4px;";
    p.appendChild(a);
    form.insertAdjacentElement("afterend", p);
  }

  function showNotice(text) {
    var form = loginForm();
    if (!form) return;
    var n = document.getElementById(NOTICE_ID);
    if (!n) {
      n = document.createElement("p");
      n.id = NOTICE_ID;
      n.setAttribute("role", "alert");
      n.dir = "auto";
      n.style.cssText = "text-align:center;font-size:.875rem;color:#dc2626;margin-top:.5rem;";
      form.insertAdjacentElement("beforebegin", n);
    }
    n.textContent = text;
  }

  // Chainlit shows a generic "Unable to sign in" for any error; surface the
  // server's message (and clear it on the next attempt).
  if (window.fetch) {
    var realFetch = window.fetch;
    window.fetch = function (input, init) {
      var url = typeof input === "string" ? input : (input && input.url) || "";
      var method = ((init && init.method) || (input && input.method) || "GET").toUpperCase();
      var p = realFetch.apply(this, arguments);
      if (method !== "POST" || !/\/login(\?|$)/.test(url)) return p;
      var old = document.getElementById(NOTICE_ID);
      if (old) old.remove();
      return p.then(function (response) {
        if (response.status === 429 || response.status === 413 || response.status === 503) {
          response.clone().json().then(function (body) {
            if (body && body.detail) setTimeout(function () { showNotice(body.detail); }, 0);
          }).catch(function () {});
        }
        return response;
      });
    };
  }

  function start() {
    addLink();
    new MutationObserver(addLink).observe(document.body, { childList: true, subtree: true });
  }
  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start);
})();
