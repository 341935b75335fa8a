// sbpg/pg/connect.hpp
//   Where and how a worker connects, shared by subscription workers and publisher workers
//   (src/pg/worker_setup.cpp): the endpoint from a namespace, the token audience, and the
//   authentication an identity gives (a shared access key, an Entra ID TokenSource, or none).
//   Include after postgres.h and sbpg/pg/config.hpp, with the C++ headers sbpg/amqp/consumer.hpp
//   and sbpg/identity/token.hpp included before postgres.h. Nothing here raises.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/connect.hpp"
#endif

#include <memory>
#include <string>

#include "sbpg/pg/config.hpp"

namespace sbpg::pg {

// Where to connect, from a namespace (a Service Bus host name: TLS on 5671; or an AMQP URL).
struct Endpoint {
	std::string host;
	int port = 0;
	bool tls = false;
	std::string error;
};
Endpoint ParseNamespace(const std::string &ns);
// The put-token name for a path in the namespace ("" for the namespace itself).
std::string Audience(const SubConfig &cfg, const Endpoint &ep, const std::string &path);
// The shared access key, from the identity's literal key, file or environment variable.
bool ResolveKey(const SubConfig &cfg, std::string *key, std::string *why);
// Fills cc's authentication from cfg's identity; an Entra ID identity gets a TokenSource in *tokens
// (not started) that writes efd when a token comes. On false, *why says why (never a secret).
bool SetupAuth(const SubConfig &cfg, const std::string &ca_file, int efd, ConsumerConfig *cc,
               std::unique_ptr<TokenSource> *tokens, std::string *why);
bool SetupTokens(const SubConfig &cfg, const std::string &ca_file, int efd, ConsumerConfig *cc,
                 std::unique_ptr<TokenSource> *tokens, std::string *why);

} // namespace sbpg::pg
