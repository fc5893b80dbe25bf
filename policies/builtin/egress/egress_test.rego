package soma.egress_test

import data.soma.egress

params := {
	"allowedDomains": ["github.com", "*.example.com"],
	"allowedCidrs": ["10.0.0.0/8"],
	"deniedCidrs": ["169.254.0.0/16", "10.96.0.0/12"],
	"minPrefixLength": 8,
}

agent(rules) := {"review": {"object": {"kind": "Agent", "spec": {"sandbox": {"egress": rules}}}}, "parameters": params}

test_good_rules_pass if {
	rules := [{"host": "api.github.com", "ports": [443]}, {"host": "github.com"}, {"host": "docs.example.com"}, {"cidr": "10.40.0.0/16", "ports": [5432]}]
	count(egress.violation) == 0 with input as agent(rules)
}

test_both_cidr_and_host if {
	some v in egress.violation with input as agent([{"cidr": "10.40.0.0/16", "host": "api.github.com"}])
	contains(v.msg, "sets both cidr and host")
}

test_neither_cidr_nor_host if {
	some v in egress.violation with input as agent([{"ports": [443]}])
	contains(v.msg, "needs a cidr")
}

test_bad_port if {
	some v in egress.violation with input as agent([{"host": "api.github.com", "ports": [0]}])
	contains(v.msg, "port 0")
}

test_malformed_hosts if {
	some bad in ["https://api.github.com", "API.GITHUB.COM", "api.github.com:443", "1.2.3.4", "localhost"]
	some v in egress.violation with input as agent([{"host": bad}])
	contains(v.msg, "not a lower-case DNS name")
}

test_every_malformed_host_is_reported if {
	rules := [{"host": "https://api.github.com"}, {"host": "API.GITHUB.COM"}, {"host": "1.2.3.4"}]
	count(egress.violation) == 3 with input as agent(rules)
}

test_lookalike_domain_is_denied if {
	some v in egress.violation with input as agent([{"host": "evilgithub.com"}])
	contains(v.msg, "outside the allowed domains")
}

test_wildcard_entry_means_subdomains_only if {
	some v in egress.violation with input as agent([{"host": "example.com"}])
	contains(v.msg, "outside the allowed domains")
}

test_wildcard_host_denied_by_default if {
	some v in egress.violation with input as agent([{"host": "*.github.com"}])
	contains(v.msg, "is a wildcard")
}

test_invalid_cidr if {
	some v in egress.violation with input as agent([{"cidr": "10.0.0.0/33"}])
	contains(v.msg, "not a valid CIDR")
}

test_too_wide_cidr if {
	some v in egress.violation with input as agent([{"cidr": "0.0.0.0/0"}])
	contains(v.msg, "more than a /8")
}

test_metadata_range_is_denied if {
	inp := {"review": {"object": {"kind": "Agent", "spec": {"sandbox": {"egress": [{"cidr": "169.254.169.254/32"}]}}}}, "parameters": {"deniedCidrs": ["169.254.0.0/16"]}}
	some v in egress.violation with input as inp
	contains(v.msg, "overlaps the denied range 169.254.0.0/16")
}

test_cidr_outside_allowed if {
	some v in egress.violation with input as agent([{"cidr": "192.168.1.0/24"}])
	contains(v.msg, "outside the allowed ranges")
}

test_no_parameters_checks_form_only if {
	inp := {"review": {"object": {"kind": "Agent", "spec": {"sandbox": {"egress": [{"host": "anything.io"}, {"cidr": "192.168.0.0/16"}]}}}}, "parameters": {}}
	count(egress.violation) == 0 with input as inp
}

test_job_template_rules if {
	inp := {"review": {"object": {"kind": "Job", "spec": {"template": {"sandbox": {"egress": [{"host": "bad_host"}]}}}}}, "parameters": {}}
	some v in egress.violation with input as inp
	startswith(v.msg, "spec.template.sandbox.egress[0]")
}
