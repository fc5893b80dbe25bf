-- Argo CD health of a soma.dev Job (gopher-lua, Lua 5.1), from the conditions the CRD documents:
-- a status for an older generation is Progressing (kstatus); then Complete=True is Healthy and
-- Failed=True is Degraded (both final); a Job held by its queue (spec.suspend, as Kueue sets it)
-- is Suspended; Stalled=True is Degraded, Reconciling=True or a Job not finished yet is
-- Progressing, and Ready=True without either (a scheduled Job waiting for its next run) is Healthy.
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

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local hs = {}
local suspended = obj.spec ~= nil and obj.spec.suspend == true
if obj.status == nil then
  if suspended then
    hs.status = "Suspended"
    hs.message = "Suspended (spec.suspend): waiting for its queue to admit it"
  else
    hs.status = "Progressing"
    hs.message = "Waiting for the Soma operator to report a status"
  end
  return hs
end
-- A status written for an older generation says nothing about this one, finished or not.
local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Soma operator to observe generation " .. tostring(generation)
  return hs
end
local complete = condition("Complete")
local failed = condition("Failed")
if is_true(failed) then
  hs.status = "Degraded"
  hs.message = describe(failed)
  return hs
end
if is_true(complete) then
  hs.status = "Healthy"
  hs.message = describe(complete)
  return hs
end
if suspended then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.suspend): waiting for its queue to admit it"
  return hs
end
local stalled = condition("Stalled")
local ready = condition("Ready")
local reconciling = condition("Reconciling")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = describe(ready or stalled)
elseif is_true(reconciling) then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
elseif is_true(ready) then
  -- A scheduled Job between runs (reason Scheduled) is settled: Healthy until a run reports.
  hs.status = "Healthy"
  hs.message = describe(ready)
elseif ready ~= nil then
  hs.status = "Progressing"
  hs.message = describe(ready)
else
  hs.status = "Progressing"
  hs.message = "Waiting for the Job to run"
end
return hs
