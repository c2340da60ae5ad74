-- The representative rule script of `cargo xtask bench waf` and the `check_cost` example.
local ip = ngx.var.remote_addr
local blocked = { ["203.0.113.1"] = true, ["203.0.113.2"] = true, ["198.51.100.9"] = true }
if blocked[ip] then return ngx.exit(403) end
local key = "rl:" .. ip
local count = ngx.shared.cache:incr(key, 1, 0, 1)
if count and count > 1000000000 then return ngx.exit(429) end
local ua = string.lower(ngx.var.http_user_agent or "")
for _, bad in ipairs({ "sqlmap", "nikto", "masscan", "zgrab" }) do
  if string.find(ua, bad, 1, true) then return ngx.exit(403) end
end
local uri = string.lower(ngx.var.request_uri)
if string.find(uri, "union%s+select") or string.find(uri, "<script")
   or string.find(uri, "%.%./") or string.find(uri, "/wp%-admin") then
  return ngx.exit(403)
end
ngx.header["X-Waf"] = "checked"
