# A Budget's caps lie within its parent's, and a parent in another namespace grants it.
#
# The parent (spec.parentRef: {namespace?, name}; the Budget's own namespace when unset) is
# read from the synced inventory. A parent in another namespace must list the child's
# namespace (or "*") in spec.allowedChildNamespaces: the grant is made by the side referred
# to, as with Gateway API's ReferenceGrant; the operator enforces it again at reconcile. Rate caps (tokensPerMinute,
# requestsPerMinute) are compared always; period caps (tokens, costMicros) when the child's
# period is no longer than the parent's (a daily child cap above a monthly parent cap can
# never be reached). Caps in different currencies are refused outright.
#
# Layout: see sandbox.rego (`problems`, `fine`, `vm_violation`, `params_typed`, `object_typed`).
package soma.budgetparent

violation contains v if {
	not fine
	some v in problems
}

vm_violation := set() if fine
else := violation if object_typed

obj := input.review.object

ns := object.get(obj, ["metadata", "namespace"], object.get(input.review, "namespace", ""))

parent_name := obj.spec.parentRef.name

parent_ns := object.get(obj.spec.parentRef, "namespace", ns)

parent := data.inventory.namespace[parent_ns]["soma.dev/v1alpha1"].Budget[parent_name]

itself if {
	parent_name == obj.metadata.name
	parent_ns == ns
}

problems contains {"msg": msg} if {
	obj.kind == "Budget"
	itself
	msg := sprintf("Budget %q names itself as its parent; set spec.parentRef to the tenant's Budget or remove it", [obj.metadata.name])
}

problems contains {"msg": msg} if {
	obj.kind == "Budget"
	parent_name
	not itself
	not parent
	msg := sprintf("Budget %q has parent %q, which does not exist in namespace %q; create the parent first (or correct spec.parentRef)", [obj.metadata.name, parent_name, parent_ns])
}

problems contains {"msg": msg} if {
	obj.kind == "Budget"
	parent_ns != ns
	not granted
	parent
	msg := sprintf("Budget %q names parent %s/%s, which does not allow children from namespace %q: its owner must add %q to its spec.allowedChildNamespaces (or correct spec.parentRef)", [obj.metadata.name, parent_ns, parent_name, ns, ns])
}

# `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, spelled with string built-ins (a regex match costs more
# than the rest of this policy, see docs/policies.md, "Performance").
namespace_name(n) if {
	n != ""
	trim(n, "abcdefghijklmnopqrstuvwxyz0123456789-") == ""
	not startswith(n, "-")
	not endswith(n, "-")
}

granted if {
	some n in object.get(parent.spec, "allowedChildNamespaces", [])
	n in {ns, "*"}
}

problems contains {"msg": msg} if {
	obj.kind == "Budget"
	some n in object.get(obj.spec, "allowedChildNamespaces", [])
	n != "*"
	not namespace_name(n)
	msg := sprintf("Budget %q lists %q in spec.allowedChildNamespaces, which is neither a namespace name nor \"*\"", [obj.metadata.name, n])
}

problems contains {"msg": msg} if {
	obj.kind == "Budget"
	some cap in ["tokensPerMinute", "requestsPerMinute"]
	mine := obj.spec.limits[cap]
	theirs := parent.spec.limits[cap]
	mine > theirs
	msg := sprintf("Budget %q sets limits.%s to %d, above its parent %q's %d; lower it to at most %d", [obj.metadata.name, cap, mine, parent_name, theirs, theirs])
}

problems contains {"msg": msg} if {
	obj.kind == "Budget"
	some cap in ["tokens", "costMicros"]
	mine := obj.spec.limits[cap]
	theirs := parent.spec.limits[cap]
	period_minutes(obj.spec.period) <= period_minutes(parent.spec.period)
	same_currency(cap)
	mine > theirs
	msg := sprintf("Budget %q sets limits.%s to %d per %s, above its parent %q's %d per %s; lower it to at most %d", [obj.metadata.name, cap, mine, period_label(obj.spec.period), parent_name, theirs, period_label(parent.spec.period), theirs])
}

currency(b) := object.get(b.spec, "currency", "USD")

same_currency(cap) if cap == "tokens"

same_currency("costMicros") if currency(obj) == currency(parent)

problems contains {"msg": msg} if {
	obj.kind == "Budget"
	obj.spec.limits.costMicros
	parent.spec.limits.costMicros
	currency(obj) != currency(parent)
	msg := sprintf("Budget %q counts cost in %s but its parent %q in %s; use the parent's currency", [obj.metadata.name, currency(obj), parent_name, currency(parent)])
}

# Period length in minutes; a calendar month counts as 31 days (its longest).
period_minutes(p) := 60 if p.calendar == "hour"

period_minutes(p) := 1440 if p.calendar == "day"

period_minutes(p) := 44640 if p.calendar == "month"

period_minutes(p) := n * unit_minutes[u] if {
	r := p.rolling
	u := substring(r, count(r) - 1, 1)
	n := to_number(substring(r, 0, count(r) - 1))
}

unit_minutes := {"m": 1, "h": 60, "d": 1440}

period_label(p) := p.calendar if p.calendar

period_label(p) := sprintf("rolling %s", [p.rolling]) if p.rolling

# Fast path: not a Budget, or a Budget without a parent whose grants name namespaces.
fine if input.review.object.kind != "Budget"

fine if {
	input.review.object.kind == "Budget"
	is_object(obj.spec)
	not "parentRef" in object.keys(obj.spec)
	children := object.get(obj.spec, "allowedChildNamespaces", [])
	is_array(children)
	every n in children {
		child_fine(n)
	}
}

child_fine(n) if n == "*"

child_fine(n) if {
	is_string(n)
	namespace_name(n)
}

params_typed if is_object(input.parameters)

object_typed if input.review.object.kind != "Budget"

object_typed if {
	is_string(obj.metadata.name)
	is_string(ns)
	budget_typed(obj)
	parent_ref_typed
	parent_typed
}

parent_ref_typed if not "parentRef" in object.keys(obj.spec)

parent_ref_typed if {
	is_object(obj.spec.parentRef)
	is_string(obj.spec.parentRef.name)
	is_string(object.get(obj.spec.parentRef, "namespace", ""))
}

parent_typed if not parent

parent_typed if budget_typed(parent)

# `object.get(x, key, <a value of the type>)`: absent, or of that type.
budget_typed(b) if {
	is_object(b.spec)
	children := object.get(b.spec, "allowedChildNamespaces", [])
	is_array(children)
	every n in children {
		is_string(n)
	}
	limits := object.get(b.spec, "limits", {})
	is_object(limits)
	every cap in ["tokens", "costMicros", "tokensPerMinute", "requestsPerMinute"] {
		integer(object.get(limits, cap, 0))
	}
	period := object.get(b.spec, "period", {})
	is_object(period)
	rolling_typed(object.get(period, "rolling", "1m"))
}

# `<digits><unit>`, as period_minutes reads it.
rolling_typed(r) if {
	is_string(r)
	count(r) >= 2
	trim(substring(r, 0, count(r) - 1), "0123456789") == ""
}

# What `%d` accepts.
integer(n) if {
	is_number(n)
	floor(n) == n
}
