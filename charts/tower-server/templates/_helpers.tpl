{{/* Chart name. */}}
{{- define "tower-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it already names the chart. */}}
{{- define "tower-server.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Namespace of the chart's namespaced objects. */}}
{{- define "tower-server.namespace" -}}
{{- default .Release.Namespace .Values.namespace }}
{{- end }}

{{- define "tower-server.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the Deployment, the PodDisruptionBudget and the `tower`
Service. In KubeSphere mode exactly the labels KubeSphere's objects use: the
`mc-<cluster>` Services the server keeps select `app: tower,
app.kubernetes.io/name: tower`, and ks-installer's Go tower Deployment selects
the same two, so its Service and mc- Services route to these pods unchanged.
*/}}
{{- define "tower-server.kubesphereLabels" -}}
{{- if and .Values.kubesphere.enabled (ne (toString .Values.kubesphere.adopt) "marked") -}}true{{- end -}}
{{- end }}

{{- define "tower-server.selectorLabels" -}}
{{- if include "tower-server.kubesphereLabels" . -}}
app: tower
app.kubernetes.io/name: tower
{{- else -}}
app.kubernetes.io/name: {{ include "tower-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
{{- end }}

{{- define "tower-server.labels" -}}
helm.sh/chart: {{ include "tower-server.chart" . }}
{{ include "tower-server.selectorLabels" . }}
{{- if include "tower-server.kubesphereLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: tower
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tower-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tower-server.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The gateway URL written into kubeconfigs. */}}
{{- define "tower-server.gatewayURL" -}}
{{- if .Values.gateway.url }}
{{- .Values.gateway.url }}
{{- else }}
{{- printf "https://%s.%s.svc:%v" .Values.service.name (include "tower-server.namespace" .) .Values.service.ports.gateway }}
{{- end }}
{{- end }}

{{/* DNS names and IPs of the gateway's serving certificate, comma-separated. */}}
{{- define "tower-server.gatewayHosts" -}}
{{- $ns := include "tower-server.namespace" . }}
{{- $svc := .Values.service.name }}
{{- $hosts := list "localhost" "127.0.0.1" $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) }}
{{- $urlHost := (urlParse (include "tower-server.gatewayURL" .)).host | default "" }}
{{- $urlHost = regexReplaceAll ":[0-9]+$" $urlHost "" | trimPrefix "[" | trimSuffix "]" }}
{{- if $urlHost }}{{ $hosts = append $hosts $urlHost }}{{ end }}
{{- range .Values.gateway.extraHosts }}{{ $hosts = append $hosts . }}{{ end }}
{{- $hosts | uniq | join "," }}
{{- end }}

{{/* The image reference. */}}
{{- define "tower-server.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* TOWER_PEER_LISTEN: peer.listenHost and peer.port, an IPv6 host bracketed. */}}
{{- define "tower-server.peerListen" -}}
{{- $host := .Values.peer.listenHost | default "0.0.0.0" | toString | trimPrefix "[" | trimSuffix "]" }}
{{- if contains ":" $host }}
{{- printf "[%s]:%v" $host .Values.peer.port }}
{{- else }}
{{- printf "%s:%v" $host .Values.peer.port }}
{{- end }}
{{- end }}
