-- Argo CD health of a soma.dev Budget (gopher-lua, Lua 5.1). kstatus: a status for an older
-- generation is Progressing; Stalled=True (an invalid spec, a parent missing or not granted)
-- is Degraded; Reconciling=True (the ledger cannot be read) is Progressing. A Budget whose cap
-- is used up (Exhausted=True) is Suspended: it is in force and refuses (or browns out) what
-- does not fit until its period ends, which is not a fault of the resource. Otherwise
-- Ready=True is Healthy, with the share used and when the caps reset.
local function condition(type_)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = c.reason or ""
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local hs = {}
if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Soma operator to report a status"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Soma operator to observe generation " .. tostring(generation)
  return hs
end
local ready = condition("Ready")
local stalled = condition("Stalled")
local reconciling = condition("Reconciling")
local exhausted = condition("Exhausted")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(ready or stalled)
elseif reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(ready or reconciling)
elseif exhausted ~= nil and exhausted.status == "True" then
  hs.status = "Suspended"
  hs.message = describe(exhausted)
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
elseif ready ~= nil then
  hs.status = "Degraded"
  hs.message = describe(ready)
else
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
end
return hs
