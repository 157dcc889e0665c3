# The default policy: who may call which route, with identity strength scaled to the
# route's sensitivity. Routes and callers live in data.yaml; this file is the logic.
#
#   low     a verified user (a session, or a JWT on its first use) is enough
#   medium  a verified user, or a calling workload the route lists in `callers`
#   high    an mTLS workload the route lists, presenting a session bound to that very
#           workload (no delegation, no bare token)
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

default signals := {}

signals := input.signals

sensitivity := s if {
	s := signals.sensitivity
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
}

allow if {
	some rule in matching
	strong_enough(rule)
}
