# The default policy: who may call which route, with identity strength scaled to the
# route's sensitivity. Routes and callers live in data.yaml; this file is the logic.
#
#   low     a verified user (a session, or a JWT on its first use) is enough
#   medium  a verified user, or a calling workload the route lists in `callers`
#   high    an mTLS workload the route lists, presenting a session bound to that very
#           workload (no delegation, no bare token)
#
# Before the access rules, the signals (input.signals): a caller on a threat list is refused
# (403 threat_listed), one over its rate limit throttled (429 rate_limited, Retry-After),
# and one behaving anomalously refused on medium and high routes (403 anomalous_behaviour).
# The reason becomes the decision's code in the audit log and the metrics.
#
# input.identity and input.signals are authz-server's additions to the OPA-Envoy input.
package envoy.authz

import rego.v1

default allow := false

default context := {}

context := input.attributes.contextExtensions

service := object.get(context, "service", "")

default identity := {}

identity := input.identity

# Signals are read field by field (input.signals.x.y), so the decision cache keys on exactly
# those fields and not on the observed rate, which moves with every request.
sensitivity := s if {
	s := input.signals.sensitivity
	s in {"low", "medium", "high"}
} else := s if {
	s := context.sensitivity
	s in {"low", "medium", "high"}
} else := "medium"

request_path := concat("/", ["", concat("/", input.parsed_path)])

workload := object.get(identity, "workload", null)

caller := workload.spiffe_id if workload != null

user := object.get(identity, "user", null)

session := object.get(identity, "session", null)

delegation := object.get(identity, "delegation", [])

# The rules of this service that match the request.
matching contains rule if {
	some rule in object.get(data.services, service, {"routes": []}).routes
	startswith(request_path, rule.prefix)
	input.attributes.request.http.method in rule.methods
}

# A caller the route names, acting for itself.
listed_caller(rule) if caller in object.get(rule, "callers", [])

# A user's own call, or a listed workload acting for the user.
user_call(rule) if {
	user != null
	object.get(rule, "users", false)
	count(delegation) == 0
}

user_call(rule) if {
	user != null
	object.get(rule, "users", false)
	count(delegation) > 0
	last := delegation[count(delegation) - 1]
	last.actor in object.get(rule, "delegates", [])
}

strong_enough(rule) if {
	sensitivity == "low"
	user_call(rule)
}

strong_enough(rule) if {
	sensitivity == "medium"
	user_call(rule)
}

strong_enough(rule) if {
	sensitivity == "medium"
	listed_caller(rule)
}

strong_enough(rule) if {
	sensitivity == "high"
	listed_caller(rule)
	session != null
	session.bound_to.spiffe_id == caller
	not bare_user_token
}

# A user's own token presented by a workload is not enough for a high route, even though a
# session now binds it to the caller: only a token exchanged for that caller (RFC 8693, its
# `act` names the caller, the last hop of input.identity.delegation) is.
bare_user_token if {
	object.get(identity, "method", "") == "jwt"
	not exchanged_for_caller
}

exchanged_for_caller if {
	count(delegation) > 0
	delegation[count(delegation) - 1].actor == caller
}

granted if {
	some rule in matching
	strong_enough(rule)
}

allow := {"allowed": false, "http_status": 403, "reason": "threat_listed"} if {
	input.signals.threat.listed
} else := {
	"allowed": false, "http_status": 429, "reason": "rate_limited",
	"headers": {"retry-after": sprintf("%d", [input.signals.rate.retry_after])},
} if {
	input.signals.rate.limited
} else := {"allowed": false, "http_status": 403, "reason": "anomalous_behaviour"} if {
	input.signals.anomaly.level == "anomalous"
	sensitivity != "low"
} else := true if {
	granted
}
