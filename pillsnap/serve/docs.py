"""API reference at /docs, rendered on the server from the app's own OpenAPI document: one HTML page with no
script and no asset from anywhere else, so it reads the same offline. (FastAPI's Swagger UI and ReDoc pages load
their JavaScript from a CDN, and no installed package ships those assets.) The raw document stays at
/openapi.json for tools."""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = """
body{font:15px/1.5 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:960px;margin:0 auto;padding:24px}
h1{margin:0 0 4px}h2{margin:32px 0 8px;font-size:18px}
.op{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:12px 0;padding:12px 16px}
.m{display:inline-block;min-width:56px;text-align:center;border-radius:4px;color:#fff;font-weight:600;
   font-size:12px;padding:2px 6px;margin-right:8px}
.get{background:#2f7d4f}.post{background:#2456a6}
code{font:13px ui-monospace,monospace;background:#eef1f5;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;width:100%;margin:6px 0}td,th{text-align:left;padding:3px 8px;
   border-bottom:1px solid #eef0f3;vertical-align:top;font-size:14px}
.muted{color:#5b6473}
"""


def _ref_name(schema: dict) -> str:
    """A readable type for a JSON schema fragment."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if schema.get("contentMediaType") == "application/octet-stream" or schema.get("format") == "binary":
        return "file"
    if "anyOf" in schema:
        return " | ".join(_ref_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_ref_name(schema.get('items', {}))}]"
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    return str(schema.get("type", "object"))


def _form_fields(op: dict, spec: dict) -> list[tuple[str, str, str]]:
    content = op.get("requestBody", {}).get("content", {})
    schema = next(iter(content.values()), {}).get("schema", {})
    if "$ref" in schema:
        schema = spec["components"]["schemas"][_ref_name(schema)]
    required = set(schema.get("required", []))
    return [(name, _ref_name(prop) + ("" if name in required else ", optional"), prop.get("description", ""))
            for name, prop in schema.get("properties", {}).items()]


def _params(op: dict, spec: dict) -> str:
    rows = [(p["name"], f"{p['in']} {_ref_name(p.get('schema', {}))}", p.get("description", ""))
            for p in op.get("parameters", [])] + _form_fields(op, spec)
    if not rows:
        return ""
    body = "".join(f"<tr><td><code>{escape(n)}</code></td><td>{escape(t)}</td><td>{escape(d)}</td></tr>"
                   for n, t, d in rows)
    return f"<table><tr><th>field</th><th>type</th><th>meaning</th></tr>{body}</table>"


def _responses(op: dict) -> str:
    items = []
    for status, resp in op.get("responses", {}).items():
        schema = next(iter(resp.get("content", {}).values()), {}).get("schema", {})
        kind = f" <code>{escape(_ref_name(schema))}</code>" if schema else ""
        items.append(f"<code>{escape(status)}</code>{kind} <span class=muted>{escape(resp.get('description', ''))}"
                     "</span>")
    return "<div>" + "<br>".join(items) + "</div>"


def _operation(path: str, method: str, op: dict, spec: dict) -> str:
    deprecated = " <span class=muted>(deprecated)</span>" if op.get("deprecated") else ""
    return (f"<div class=op><span class='m {method}'>{method.upper()}</span><code>{escape(path)}</code>{deprecated}"
            f"<div><b>{escape(op.get('summary', ''))}</b></div>"
            f"<div class=muted>{escape(op.get('description', ''))}</div>{_params(op, spec)}{_responses(op)}</div>")


def _schema(name: str, schema: dict) -> str:
    rows = "".join(f"<tr><td><code>{escape(f)}</code></td><td>{escape(_ref_name(p))}</td>"
                   f"<td>{escape(p.get('description', ''))}</td></tr>"
                   for f, p in schema.get("properties", {}).items())
    return f"<div class=op><b>{escape(name)}</b><table>{rows}</table></div>"


def render_docs(spec: dict[str, Any]) -> str:
    """The whole reference page for an OpenAPI document."""
    info = spec.get("info", {})
    ops = "".join(_operation(path, method, op, spec) for path, methods in spec.get("paths", {}).items()
                  for method, op in methods.items())
    schemas = "".join(_schema(n, s) for n, s in sorted(spec.get("components", {}).get("schemas", {}).items())
                      if not n.startswith(("Body_", "HTTPValidationError", "ValidationError")))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(info.get('title', 'API'))} API"
            f"</title><meta name=viewport content='width=device-width,initial-scale=1'><style>{STYLE}</style></head>"
            f"<body><main><h1>{escape(info.get('title', ''))} API <span class=muted>{escape(info.get('version', ''))}"
            f"</span></h1><p class=muted>{escape(info.get('description', ''))} Machine-readable: "
            f"<a href='/openapi.json'>/openapi.json</a>. Try it: <a href='/'>the upload page</a>.</p>"
            f"<h2>Endpoints</h2>{ops}<h2>Schemas</h2>{schemas}</main></body></html>")
