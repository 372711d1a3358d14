// Jarvis Argus's page script, loaded by `custom_js = "/public/signup-link.js"` in
// .chainlit/config.toml (the name is kept: tests and deployments refer to it). It
//
// * sets <html lang> and <html dir> from the UI language: Chainlit 2.12 leaves the page's
//   <html lang="en"> as it is, so public/argus.css could not tell a Persian page. A first guess
//   comes from the browser language; then the translation Chainlit actually loads
//   (GET /project/translations, which a forced `[UI] language` overrides) decides: its text's
//   first strong character gives the direction, like dir="auto";
// * adds the product's subtitle under the login title and "No account? Sign up" under the
//   login form, in the page's language;
// * shows the server's message when POST /login answers 429 ("Too many failed sign-in
//   attempts..."), 413 (form too large) or 503 ("Storage is unavailable right now...").
//
// The login page is rendered by React, so a MutationObserver re-adds our elements whenever
// the form is (re)drawn.
(function () {
  "use strict";
  var LINK_ID = "argus-signup-link";
  var NOTICE_ID = "argus-login-notice";
  var SUBTITLE_ID = "argus-login-subtitle";

  // Our few strings, by primary language subtag (Chainlit's own come from .chainlit/translations).
  var TEXT = {
    en: {
      subtitle: "Your private assistant, answering from a model on this server.",
      noAccount: "No account? ",
      signUp: "Sign up"
    },
    fa: {
      subtitle: "دستیار خصوصی شما، با مدلی که روی همین سرور اجرا می‌شود.",
      noAccount: "حساب ندارید؟ ",
      signUp: "ثبت‌نام کنید"
    }
  };
  var RTL_LANGUAGES = ["ar", "fa", "he", "iw", "ur", "ps", "ckb", "dv", "yi", "sd", "ug"];
  // Strong right-to-left letters: Hebrew, Arabic (with Persian), Syriac, Thaana, NKo and the
  // Hebrew/Arabic presentation forms; strong left-to-right: Latin, Greek, Cyrillic, CJK...
  var STRONG_RTL = /[\u0590-\u08FF\uFB1D-\uFDFF\uFE70-\uFEFC]/;
  var STRONG_LTR = /[A-Za-z\u00C0-\u024F\u0370-\u03FF\u0400-\u04FF\u0900-\u0DFF\u3040-\u9FFF\uAC00-\uD7AF]/;

  function primary(lang) {
    return String(lang || "en").toLowerCase().split(/[-_]/)[0];
  }

  function text(key) {
    var t = TEXT[primary(document.documentElement.lang)] || TEXT.en;
    return t[key];
  }

  // The direction of a text, like dir="auto": its first strong character decides.
  function directionOf(s) {
    for (var i = 0; i < s.length; i++) {
      var c = s.charAt(i);
      if (STRONG_RTL.test(c)) return "rtl";
      if (STRONG_LTR.test(c)) return "ltr";
    }
    return null;
  }

  function setLanguage(lang, dir) {
    var html = document.documentElement;
    if (lang && html.lang !== lang) html.lang = lang;
    if (dir && html.dir !== dir) html.dir = dir;
    refresh();
  }

  // First guess, before Chainlit's translation arrives (no flash of a left-to-right page).
  (function () {
    var lang = (navigator.languages && navigator.languages[0]) || navigator.language || "en-US";
    setLanguage(lang, RTL_LANGUAGES.indexOf(primary(lang)) >= 0 ? "rtl" : "ltr");
  })();

  // What Chainlit loaded: {"translation": {...}} for the language asked (or the forced one).
  function onTranslation(url, body) {
    var tr = body && body.translation;
    if (!tr) return;
    var sample = [
      tr.auth && tr.auth.login && tr.auth.login.title,
      tr.chat && tr.chat.input && tr.chat.input.placeholder,
      tr.common && tr.common.actions && tr.common.actions.cancel
    ].join(" ");
    var asked = /[?&]language=([^&]+)/.exec(url);
    var lang = asked ? decodeURIComponent(asked[1]) : document.documentElement.lang;
    var dir = directionOf(sample) || "ltr";
    // A forced language may differ from the one asked: keep the direction the text has.
    if ((dir === "rtl") !== (RTL_LANGUAGES.indexOf(primary(lang)) >= 0)) lang = forcedLanguage || lang;
    setLanguage(lang, dir);
  }

  var forcedLanguage = null; // [UI] language, when /project/settings tells it (signed in)
  function onSettings(body) {
    var forced = body && body.ui && body.ui.language;
    if (forced) {
      forcedLanguage = forced;
      setLanguage(forced, null);
    }
  }

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
    if (!form || (existing && existing.previousElementSibling === form && existing.lang === document.documentElement.lang)) return;
    if (existing) existing.remove();
    var p = document.createElement("p");
    p.id = LINK_ID;
    p.lang = document.documentElement.lang;
    p.dir = "auto";
    p.style.cssText = "text-align:center;font-size:.875rem;margin-top:1rem;";
    p.appendChild(document.createTextNode(text("noAccount")));
    var a = document.createElement("a");
    a.href = base() + "/signup";
    a.textContent = text("signUp");
    a.style.cssText = "text-decoration:underline;text-underline-offset:4px;";
    p.appendChild(a);
    form.insertAdjacentElement("afterend", p);
  }

  // The product's subtitle under the login form's title.
  function addSubtitle() {
    var existing = document.getElementById(SUBTITLE_ID);
    var form = onLoginPage() ? loginForm() : null;
    var title = form ? form.querySelector("h1") : null;
    if (!title) {
      if (existing) existing.remove();
      return;
    }
    var lang = document.documentElement.lang;
    if (existing && existing.previousElementSibling === title && existing.lang === lang) return;
    if (existing) existing.remove();
    var p = document.createElement("p");
    p.id = SUBTITLE_ID;
    p.lang = lang;
    p.dir = "auto";
    p.className = "text-sm text-muted-foreground";
    p.textContent = text("subtitle");
    title.insertAdjacentElement("afterend", p);
  }

  function refresh() {
    if (!document.body) return;
    addSubtitle();
    addLink();
  }

  function showNotice(message) {
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
    n.textContent = message;
  }

  // Chainlit shows a generic "Unable to sign in" for any error; surface the
  // server's message (and clear it on the next attempt).
  if (window.fetch) {
    var realFetch = window.fetch;
    window.fetch = function (input, init) {
      var url = typeof input === "string" ? input : (input && input.url) || "";
      var method = ((init && init.method) || (input && input.method) || "GET").toUpperCase();
      var p = realFetch.apply(this, arguments);
      if (method === "GET" && /\/project\/(translations|settings)(\?|$)/.test(url)) {
        p.then(function (response) {
          if (!response.ok) return;
          response.clone().json().then(function (body) {
            if (/\/project\/translations/.test(url)) onTranslation(url, body);
            else onSettings(body);
          }).catch(function () {});
        }).catch(function () {});
        return p;
      }
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
    refresh();
    new MutationObserver(refresh).observe(document.body, { childList: true, subtree: true });
  }
  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start);
})();
