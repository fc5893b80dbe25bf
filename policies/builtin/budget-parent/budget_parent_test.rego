package soma.budgetparent_test

import data.soma.budgetparent

tenant := {"spec": {"limits": {"costMicros": 2000000000, "tokensPerMinute": 500000, "tokens": 100000000}, "period": {"calendar": "month"}, "currency": "USD"}}

inventory := {"namespace": {"research": {"soma.dev/v1alpha1": {"Budget": {"acme-tenant": tenant}}}}}

budget(name, spec) := {"review": {"namespace": "research", "object": {"kind": "Budget", "metadata": {"name": name, "namespace": "research"}, "spec": spec}}, "parameters": {}}

team(limits, period) := {"parentRef": {"name": "acme-tenant"}, "limits": limits, "period": period}

test_within_parent if {
	inp := budget("team", team({"costMicros": 250000000, "tokensPerMinute": 400000}, {"calendar": "day"}))
	count(budgetparent.violation) == 0 with input as inp with data.inventory as inventory
}

test_rate_cap_above_parent if {
	inp := budget("team", team({"tokensPerMinute": 600000}, {"calendar": "day"}))
	some v in budgetparent.violation with input as inp with data.inventory as inventory
	contains(v.msg, "limits.tokensPerMinute to 600000, above its parent \"acme-tenant\"'s 500000")
}

test_daily_cost_above_monthly_parent if {
	inp := budget("team", team({"costMicros": 3000000000}, {"calendar": "day"}))
	some v in budgetparent.violation with input as inp with data.inventory as inventory
	contains(v.msg, "per day")
}

test_longer_child_period_is_not_compared if {
	yearly := {"namespace": {"research": {"soma.dev/v1alpha1": {"Budget": {"acme-tenant": {"spec": {"limits": {"tokens": 10}, "period": {"calendar": "hour"}}}}}}}}
	inp := budget("team", team({"tokens": 1000}, {"calendar": "day"}))
	count(budgetparent.violation) == 0 with input as inp with data.inventory as yearly
}

test_rolling_period if {
	inp := budget("team", team({"tokens": 200000000}, {"rolling": "7d"}))
	count(budgetparent.violation) == 1 with input as inp with data.inventory as inventory
}

test_missing_parent if {
	inp := budget("team", team({"tokens": 1}, {"calendar": "day"}))
	some v in budgetparent.violation with input as inp with data.inventory as {}
	contains(v.msg, "does not exist")
}

test_self_parent if {
	inp := budget("acme-tenant", team({"tokens": 1}, {"calendar": "day"}))
	some v in budgetparent.violation with input as inp with data.inventory as inventory
	contains(v.msg, "names itself")
}

test_currency_mismatch if {
	spec := object.union(team({"costMicros": 1}, {"calendar": "day"}), {"currency": "EUR"})
	some v in budgetparent.violation with input as budget("team", spec) with data.inventory as inventory
	contains(v.msg, "counts cost in EUR")
}

test_no_parent_no_check if {
	inp := budget("solo", {"limits": {"tokens": 1}, "period": {"calendar": "day"}})
	count(budgetparent.violation) == 0 with input as inp with data.inventory as {}
}

platform_inventory(grants) := {"namespace": {"platform": {"soma.dev/v1alpha1": {"Budget": {"tenant": {"spec": {"limits": {"costMicros": 2000000000}, "period": {"calendar": "month"}, "allowedChildNamespaces": grants}}}}}}}

cross := budget("team", {"parentRef": {"namespace": "platform", "name": "tenant"}, "limits": {"costMicros": 1000}, "period": {"calendar": "day"}})

test_a_parent_in_another_namespace_must_grant_the_child if {
	some v in budgetparent.violation with input as cross with data.inventory as platform_inventory([])
	contains(v.msg, "does not allow children from namespace \"research\"")
	contains(v.msg, "spec.allowedChildNamespaces")
}

test_a_granting_parent_in_another_namespace_is_accepted if {
	count(budgetparent.violation) == 0 with input as cross with data.inventory as platform_inventory(["research"])
	count(budgetparent.violation) == 0 with input as cross with data.inventory as platform_inventory(["*"])
}

test_the_same_name_in_another_namespace_is_not_itself if {
	inp := budget("tenant", {"parentRef": {"namespace": "platform", "name": "tenant"}, "limits": {"costMicros": 1}, "period": {"calendar": "day"}})
	count(budgetparent.violation) == 0 with input as inp with data.inventory as platform_inventory(["research"])
}

test_grant_entries_are_namespaces if {
	inp := budget("tenant", {"limits": {"costMicros": 1}, "period": {"calendar": "day"}, "allowedChildNamespaces": ["team-a", "*", "Team_B"]})
	some v in budgetparent.violation with input as inp with data.inventory as inventory
	contains(v.msg, "\"Team_B\"")
	count(budgetparent.violation) == 1 with input as inp with data.inventory as inventory
}
