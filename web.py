"""The team's chat page: `GET /` and its static files, served with headers that lock the page down."""

from flask import Blueprint

# Only the app's own files may run or style the page: no inline script or style, no eval,
# no framing, and the sign-in form can never send the token anywhere.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self'",
    "connect-src 'self'", "object-src 'none'", "base-uri 'none'", "form-action 'none'",
    "frame-ancestors 'none'"])
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}

web = Blueprint("web", __name__, static_folder="static", static_url_path="/static")


@web.get("/")
def page():
    """The chat page (static HTML: the scripts it loads do the rest through the public API)."""
    response = web.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@web.after_request
def lock_down(response):
    """Add the page's security headers to the page and every static file."""
    response.headers.update(PAGE_HEADERS)
    return response


def sign_in_link(token, base_url):
    """The page's address with the token in the fragment, which browsers never send to the server."""
    return f"{base_url.rstrip('/')}/#token={token}"


def init_app(app):
    """Serve the page at `/` and its files under `/static/`, unless WEB_UI is off."""
    if app.config["WEB_UI"]:
        app.register_blueprint(web)
